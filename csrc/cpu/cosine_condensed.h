// The condensed float64 cosine-distance matrix scikit-learn hands to scipy's linkage, built
// from L2-normalised features, and the checks and cut around the NN-chain that consumes it.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/bf16x6.h"
#include "cpu/checks.h"
#include "cpu/huge_buffer.h"
#include "cpu/nn_chain.h"

namespace insid3_cpu {

// Number of entries of the condensed matrix of n items, n (n - 1) / 2, checked so that its
// float64 buffer's size in bytes fits int64.
inline int64_t condensed_size(int64_t n, const char* op) {
  const int64_t pairs = n > 1 ? checked_mul(n, n - 1, op, "the number of pairs N * (N - 1)") / 2 : 0;
  checked_mul(pairs, static_cast<int64_t>(sizeof(double)), op, "the size in bytes of the N * (N - 1) / 2 distances");
  return pairs;
}

// (N, C) float32 features, contiguous or the transposed view of a (C, N) map (MKL gives the
// same products as for the contiguous copy, checked in the tests); anything else is copied.
// Rejects non-finite features and magnitudes whose float32 dots could overflow
// (max|features| or C * max|features|^2 >= 2^100), so every distance is finite.
inline at::Tensor linkage_features(const at::Tensor& features, const char* op) {
  TORCH_CHECK(features.device().is_cpu(), op, " (CPU): features must be a CPU tensor");
  TORCH_CHECK(features.scalar_type() == at::kFloat, op, ": features must be float32, got ",
              features.scalar_type());
  TORCH_CHECK(features.dim() == 2, op, ": features must be (N, C), got ", features.sizes());
  const int64_t n = features.size(0);
  condensed_size(n, op);
  const bool transposed = features.stride(0) == 1 && features.stride(1) == n;
  const at::Tensor X = transposed ? features : features.contiguous();
  const float amax = finite_absmax(X, op, "features");
  check_dot_magnitude(op, features.size(1), amax, amax, "features", "features");
  return X;
}

inline void require_finite(bool finite, const char* op) {
  TORCH_CHECK(finite, op, ": the distances must be finite (scipy's linkage rejects NaN/inf)");
}

// Condensed dist = 1 - clamp(X X^T, -1, 1) in float32, as torch computes it, widened to
// double. Rows come in blocks; each block is at::mm of rows [i0, i1) against rows [i0, n):
// the GEMM torch runs for X @ X.T restricted to those rows and columns (bitwise equal to the
// full product with MKL, checked in the tests), about half of the full product's work.
// bf16x6: X X^T as the split-bf16 product (common/bf16x6.h), the same blocks of the two views
// of the shared Gram buffer as the CUDA kernel multiplies.
inline HugeBuffer cosine_distances_condensed(const at::Tensor& X, const char* op, bool bf16x6 = false) {
  constexpr int64_t kRowBlock = 512;
  const int64_t n = X.size(0), C = X.size(1);
  const int64_t pairs = condensed_size(n, op);
  const std::vector<int64_t> off = condensed_row_offsets(n);
  at::Tensor left = X, right = X;
  if (bf16x6) {
    checked_mul(checked_mul(n, C, op, "the features' size N * C"), 4 * insid3::kBf16x6GramBlocks, op,
                "the size in bytes of the bf16x6 operand, 28 N C");
    const at::Tensor S = bf16x6_operand(X, insid3::kBf16x6Gram, insid3::kBf16x6GramBlocks, false);
    left = S.narrow(1, insid3::kBf16x6GramLeft * C, insid3::kBf16x6Blocks * C);
    right = S.narrow(1, insid3::kBf16x6GramRight * C, insid3::kBf16x6Blocks * C);
  }
  HugeBuffer D(pairs);
  bool finite = true;
  for (int64_t i0 = 0; i0 + 1 < n; i0 += kRowBlock) {
    const int64_t B = std::min(kRowBlock, n - i0);
    const at::Tensor G = at::mm(left.narrow(0, i0, B), right.narrow(0, i0, n - i0).t()).contiguous();
    const float* g = G.data_ptr<float>();
    const int64_t ld = n - i0;
    // Arithmetic only: nothing in the region allocates or throws.
#pragma omp parallel for schedule(dynamic, 16) reduction(&& : finite)
    for (int64_t r = 0; r < B; ++r) {
      const int64_t i = i0 + r;
      double* out = D.data() + off[i];
      bool row_finite = true;
      for (int64_t j = i + 1; j < n; ++j) {
        const float s = g[r * ld + (j - i0)];
        const float c = s < -1.f ? -1.f : (s > 1.f ? 1.f : s);  // NaN stays NaN, like clamp
        out[j] = static_cast<double>(1.f - c);
        row_finite &= std::isfinite(c);
      }
      finite = finite && row_finite;
    }
  }
  require_finite(finite, op);
  return D;
}

// scikit-learn's labels: the threshold cut of the merges, numbered by first appearance.
inline at::Tensor cut_labels(const std::vector<Merge>& merges, int64_t n, double threshold,
                             const at::TensorOptions& opt) {
  at::Tensor labels = at::empty({n}, opt.dtype(at::kLong));
  if (n > 0) cut_merges(merges, n, threshold, labels.data_ptr<int64_t>());
  return labels;
}

}  // namespace insid3_cpu
