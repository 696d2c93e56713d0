// Exact-argmax helpers shared by the CPU and CUDA nn_vote kernels.
//
// The fast pass scores with a float32 GEMM; every key whose float32 score lies within
// `fp32_dot_error_bound` of the best one is re-scored here in double, in one fixed order,
// so both backends pick the same index: the argmax of the (nearly exact) double dot
// product, ties to the lowest index.
#pragma once
#include <cstdint>
#include <cmath>
#include "macros.h"

namespace insid3 {

// Products of two floats are exact in double, so the only rounding is the sequential
// sum; the order (k = 0..C-1) is the same on every backend.
INSID3_HD double dot_f32_as_f64(const float* a, const float* b, int64_t C) {
  double acc = 0.0;
  for (int64_t k = 0; k < C; ++k) acc += static_cast<double>(a[k]) * static_cast<double>(b[k]);
  return acc;
}

// A bound on |fp32 GEMM dot - exact dot| for vectors of norms na, nb and length C
// (gamma_C = C u / (1 - C u), u = 2^-24, applied to sum |a_k b_k| <= na nb), doubled
// because both compared scores carry an error.
INSID3_HD float fp32_dot_error_bound(float na, float nb, int64_t C) {
  const double u = 5.9604644775390625e-08;  // 2^-24
  const double cu = static_cast<double>(C) * u;
  return static_cast<float>(2.0 * cu / (1.0 - cu) * static_cast<double>(na) * static_cast<double>(nb)) + 1e-30f;
}

// The same bound for a GEMM on bf16-rounded inputs with float32 accumulation and a bf16
// result (torch's CPU bf16 matmul): input rounding (2b + b^2, b = 2^-9), accumulation
// (gamma_C), output rounding (b), for both compared scores, with a further factor 2 of
// margin for the GEMM's internals.
INSID3_HD float bf16_dot_error_bound(float na, float nb, int64_t C) {
  const double b = 1.0 / 512.0;
  const double cu = static_cast<double>(C) * 5.9604644775390625e-08;
  const double gamma = cu / (1.0 - cu);
  const double in = 2.0 * b + b * b;
  const double rel = in + gamma * (1.0 + in) + b * (1.0 + in) * (1.0 + gamma);
  return static_cast<float>(4.0 * rel * static_cast<double>(na) * static_cast<double>(nb)) + 1e-30f;
}

// Is (v, j) better than the current best (best_v, best_j)? Larger value wins, ties to the lower index.
INSID3_HD bool better_max(double v, int64_t j, double best_v, int64_t best_j) {
  return v > best_v || (v == best_v && j < best_j);
}

}  // namespace insid3
