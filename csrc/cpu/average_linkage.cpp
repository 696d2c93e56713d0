// CPU kernels of insid3_fast::average_linkage_precomputed and insid3_fast::average_linkage:
// exact average-linkage clustering with scikit-learn's distance_threshold cut.
//
// Both build scipy's condensed float64 matrix (the upper triangle, as scikit-learn passes it)
// and run scipy's NN-chain (nn_chain.h), so the partition equals
// AgglomerativeClustering(metric='precomputed', linkage='average', distance_threshold=t).
// Memory: the condensed matrix, N (N - 1) / 2 doubles.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cpu/cosine_condensed.h"
#include "cpu/release_gil.h"

namespace {

// Input rule: every entry of dist (both triangles, as scikit-learn checks) must be finite;
// threshold must not be NaN (+-inf cut at every / no merge). Errors name the op (checks.h).
at::Tensor average_linkage_precomputed_impl(const at::Tensor& dist, double threshold) {
  TORCH_CHECK(dist.device().is_cpu(), "average_linkage_precomputed (CPU): dist must be a CPU tensor");
  TORCH_CHECK(dist.scalar_type() == at::kFloat, "average_linkage_precomputed: dist must be float32, got ",
              dist.scalar_type());
  TORCH_CHECK(dist.dim() == 2 && dist.size(0) == dist.size(1),
              "average_linkage_precomputed: dist must be a square (N, N) matrix, got ", dist.sizes());
  insid3_cpu::check_threshold(threshold, "average_linkage_precomputed");
  const int64_t n = dist.size(0);
  const at::Tensor d = dist.contiguous();
  insid3_cpu::finite_absmax(d, "average_linkage_precomputed", "dist");
  const float* dp = d.data_ptr<float>();
  const int64_t pairs = insid3_cpu::condensed_size(n, "average_linkage_precomputed");
  const std::vector<int64_t> off = insid3_cpu::condensed_row_offsets(n);
  insid3_cpu::HugeBuffer D(pairs);
  // No allocation and nothing that throws inside the region.
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) D[off[i] + j] = static_cast<double>(dp[i * n + j]);
  return insid3_cpu::cut_labels(insid3_cpu::nn_chain_average(D.data(), n), n, threshold, dist.options());
}

// Input rule: features finite with C * max|features|^2 < 2^100 (linkage_features); threshold
// not NaN.
at::Tensor average_linkage_impl(const at::Tensor& features, double threshold, bool bf16x6) {
  insid3_cpu::check_threshold(threshold, "average_linkage");
  const at::Tensor X = insid3_cpu::linkage_features(features, "average_linkage");
  const insid3_cpu::MaybeReleaseGIL no_gil;
  const int64_t n = X.size(0);
  insid3_cpu::HugeBuffer D = insid3_cpu::cosine_distances_condensed(X, "average_linkage", bf16x6);
  return insid3_cpu::cut_labels(insid3_cpu::nn_chain_average(D.data(), n), n, threshold, features.options());
}

at::Tensor average_linkage_precomputed_cpu(const at::Tensor& dist, double threshold) {
  return insid3_cpu::guard_alloc("average_linkage_precomputed",
                                 [&] { return average_linkage_precomputed_impl(dist, threshold); });
}

at::Tensor average_linkage_cpu(const at::Tensor& features, double threshold, bool bf16x6) {
  return insid3_cpu::guard_alloc("average_linkage", [&] { return average_linkage_impl(features, threshold, bf16x6); });
}

}  // namespace

TORCH_LIBRARY_IMPL(insid3_fast, CPU, m) {
  m.impl("average_linkage_precomputed", &average_linkage_precomputed_cpu);
  m.impl("average_linkage", &average_linkage_cpu);
}
