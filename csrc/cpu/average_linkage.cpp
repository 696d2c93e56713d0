// CPU kernels of insid3_fast::average_linkage_precomputed and insid3_fast::average_linkage:
// exact average-linkage clustering with scikit-learn's distance_threshold cut.
//
// Both build scipy's condensed float64 matrix (the upper triangle, as scikit-learn passes it)
// and run scipy's NN-chain (nn_chain.h), so the partition equals
// AgglomerativeClustering(metric='precomputed', linkage='average', distance_threshold=t).
// Memory: the condensed matrix, N (N - 1) / 2 doubles.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/huge_buffer.h"
#include "cpu/nn_chain.h"
#include "cpu/release_gil.h"

namespace {

// Row blocks of the Gram matrix; each block only computes its columns j >= first row.
constexpr int64_t kRowBlock = 512;

at::Tensor cluster_condensed(insid3_cpu::HugeBuffer& D, int64_t n, double threshold, const at::TensorOptions& opt) {
  at::Tensor labels = at::empty({n}, opt.dtype(at::kLong));
  if (n == 0) return labels;
  const std::vector<insid3_cpu::Merge> merges = insid3_cpu::nn_chain_average(D.data(), n);
  insid3_cpu::cut_merges(merges, n, threshold, labels.data_ptr<int64_t>());
  return labels;
}

void check_finite(const insid3_cpu::HugeBuffer& D, const char* op) {
  bool finite = true;
#pragma omp parallel for reduction(&& : finite)
  for (int64_t i = 0; i < D.size(); ++i) finite = finite && std::isfinite(D.data()[i]);
  TORCH_CHECK(finite, op, ": the distances must be finite (scipy's linkage rejects NaN/inf)");
}

at::Tensor average_linkage_precomputed_cpu(const at::Tensor& dist, double threshold) {
  TORCH_CHECK(dist.device().is_cpu(), "average_linkage_precomputed (CPU): dist must be a CPU tensor");
  TORCH_CHECK(dist.scalar_type() == at::kFloat, "average_linkage_precomputed: dist must be float32, got ",
              dist.scalar_type());
  TORCH_CHECK(dist.dim() == 2 && dist.size(0) == dist.size(1),
              "average_linkage_precomputed: dist must be a square (N, N) matrix, got ", dist.sizes());
  const int64_t n = dist.size(0);
  const at::Tensor d = dist.contiguous();
  const float* dp = d.data_ptr<float>();
  const std::vector<int64_t> off = insid3_cpu::condensed_row_offsets(n);
  insid3_cpu::HugeBuffer D(n > 1 ? n * (n - 1) / 2 : 0);
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) D[off[i] + j] = static_cast<double>(dp[i * n + j]);
  check_finite(D, "average_linkage_precomputed");
  return cluster_condensed(D, n, threshold, dist.options());
}

at::Tensor average_linkage_cpu(const at::Tensor& features, double threshold) {
  TORCH_CHECK(features.device().is_cpu(), "average_linkage (CPU): features must be a CPU tensor");
  TORCH_CHECK(features.scalar_type() == at::kFloat, "average_linkage: features must be float32, got ",
              features.scalar_type());
  TORCH_CHECK(features.dim() == 2, "average_linkage: features must be (N, C), got ", features.sizes());
  const int64_t n = features.size(0);
  // A transposed view of a (C, N) feature map is used as is (MKL gives the same products as
  // for the contiguous copy, checked in the tests); anything else is made contiguous.
  const bool transposed = features.stride(0) == 1 && features.stride(1) == n;
  const at::Tensor X = transposed ? features : features.contiguous();
  const insid3_cpu::MaybeReleaseGIL no_gil;
  const std::vector<int64_t> off = insid3_cpu::condensed_row_offsets(n);
  insid3_cpu::HugeBuffer D(n > 1 ? n * (n - 1) / 2 : 0);
  // dist = 1 - clamp(X X^T, -1, 1) in float32, as torch computes it. Each block is at::mm of
  // rows [i0, i1) against rows [i0, n): the same GEMM torch runs for X @ X.T restricted to
  // those rows and columns (bitwise equal to the full product with MKL, checked in the tests).
  for (int64_t i0 = 0; i0 + 1 < n; i0 += kRowBlock) {
    const int64_t B = std::min(kRowBlock, n - i0);
    const at::Tensor G = at::mm(X.narrow(0, i0, B), X.narrow(0, i0, n - i0).t()).contiguous();
    const float* g = G.data_ptr<float>();
    const int64_t ld = n - i0;
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t r = 0; r < B; ++r) {
      const int64_t i = i0 + r;
      double* out = D.data() + off[i];
      for (int64_t j = i + 1; j < n; ++j) {
        const float s = g[r * ld + (j - i0)];
        const float c = s < -1.f ? -1.f : (s > 1.f ? 1.f : s);  // NaN stays NaN, like clamp
        out[j] = static_cast<double>(1.f - c);
      }
    }
  }
  check_finite(D, "average_linkage");
  return cluster_condensed(D, n, threshold, features.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(insid3_fast, CPU, m) {
  m.impl("average_linkage_precomputed", &average_linkage_precomputed_cpu);
  m.impl("average_linkage", &average_linkage_cpu);
}
