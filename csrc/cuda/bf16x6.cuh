// The bf16x6 operands and product on the device (common/bf16x6.h says what they are): one kernel
// writes the operand, one tensor-core GEMM multiplies two of them.
#pragma once
#include <ATen/ATen.h>

#include "common/bf16x6.h"
#include "cuda/cuda_utils.cuh"

namespace insid3_cuda {

// Which parts go in which block of an operand, and whether the blocks lie along the columns
// (an (R, blocks * K) operand: the left one, the Gram buffer) or along the rows (a
// (blocks * R, K) operand: the right one of a product a @ b).
struct Bf16x6Layout {
  int parts[insid3::kBf16x6GramBlocks];
  int blocks;
  bool along_rows;
};

namespace {
// x (R, K) with strides (s0, s1) -> out, as bf16 bits: one thread per element of x, which splits
// it once and writes its parts to every block.
__global__ void bf16x6_operand_kernel(const float* __restrict__ x, int64_t R, int64_t K, int64_t s0, int64_t s1,
                                      Bf16x6Layout layout, uint16_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < R * K; e += stride) {
    const int64_t r = e / K, k = e % K;
    uint16_t p[3];
    insid3::split_bf16x3(x[r * s0 + k * s1], p);
    for (int t = 0; t < layout.blocks; ++t) {
      const int64_t at = layout.along_rows ? (t * R + r) * K + k : (r * layout.blocks + t) * K + k;
      out[at] = p[layout.parts[t]];
    }
  }
}
}  // namespace

// The operand of x (R, K) float32 on the device, any strides: bf16, (R, blocks K) or (blocks R, K).
inline at::Tensor bf16x6_operand(const at::Tensor& x, const int* parts, int blocks, bool along_rows) {
  constexpr int threads = 256;
  Bf16x6Layout layout{};
  for (int t = 0; t < blocks; ++t) layout.parts[t] = parts[t];
  layout.blocks = blocks;
  layout.along_rows = along_rows;
  const int64_t R = x.size(0), K = x.size(1);
  auto out = along_rows ? at::empty({blocks * R, K}, x.options().dtype(at::kBFloat16))
                        : at::empty({R, blocks * K}, x.options().dtype(at::kBFloat16));
  if (R * K == 0) return out;
  const unsigned int grid = grid_1d(std::min<int64_t>(R * K, int64_t(4096) * threads), threads);
  INSID3_LAUNCH(bf16x6_operand_kernel, grid, threads, 0, c10::cuda::getCurrentCUDAStream())(
      x.data_ptr<float>(), R, K, x.stride(0), x.stride(1), layout,
      reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// out (float32, written in place, any row stride) = a @ b for bf16x6 operands a (M, 6K) and
// b (6K, P): one bf16 GEMM (bf16_gemm) under its own profiler scope. In the emulation the float32
// GEMM of the CPU kernels, so the same bits as the CPU op whatever the operands' strides (the CPU
// GEMM's result does not depend on them; checked in the tests).
inline void bf16x6_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  bf16_gemm(out, a, b, "insid3_fast::bf16x6_gemm");
}

}  // namespace insid3_cuda
