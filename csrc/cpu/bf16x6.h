// The bf16x6 operands on the CPU (common/bf16x6.h says what they are), held as float32: the CPU
// GEMM multiplies their bf16-exact values in float32, exactly as products.
#pragma once
#include <ATen/ATen.h>

#include "common/bf16x6.h"

namespace insid3_cpu {

// The operand of x (R, K) float32, any strides: (R, blocks K) with the blocks along the columns,
// or (blocks R, K) along the rows; block t holds part parts[t] of every element. The layout of
// the CUDA kernel (cuda/bf16x6.cuh), as float32 instead of bf16.
inline at::Tensor bf16x6_operand(const at::Tensor& x, const int* parts, int blocks, bool along_rows) {
  const int64_t R = x.size(0), K = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  at::Tensor out = along_rows ? at::empty({blocks * R, K}, x.options()) : at::empty({R, blocks * K}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Arithmetic only: nothing in the region allocates or throws.
#pragma omp parallel for schedule(static) if (R * K > (int64_t(1) << 15))
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k) {
      uint16_t p[3];
      insid3::split_bf16x3(xp[r * s0 + k * s1], p);
      for (int t = 0; t < blocks; ++t) {
        const int64_t at = along_rows ? (t * R + r) * K + k : (r * blocks + t) * K + k;
        op[at] = insid3::bf16_bits_float(p[parts[t]]);
      }
    }
  return out;
}

}  // namespace insid3_cpu
