// CPU kernel of insid3_fast::cluster_and_vote: average_linkage and nn_vote in one call, with
// the NN-chain running beside the voting GEMMs.
//
// scipy's NN-chain is sequential (about a third of a 1-shot episode at 1024 px), so alone it
// leaves every other core idle. Here, once the distance matrix is built (all threads), thread 0
// of an OpenMP team runs the chain while the other threads score query ranges, one
// single-threaded GEMM each (inside a parallel region MKL, oneDNN and ATen run sequentially);
// thread 0 joins the voting when its chain is done. Results equal the two ops': the chain is
// unchanged and every query's argmax is exact whatever range it is scored in.
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "cpu/cosine_condensed.h"
#include "cpu/nn_vote_job.h"
#include "cpu/release_gil.h"

namespace {

// Active queries per range when the voting shares the cores with the chain: small enough that
// the last ranges balance the threads, large enough that one GEMM amortises packing the keys.
constexpr int64_t kRange = 128;

// Input rule: average_linkage's on features and threshold, nn_vote's on the rest.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_and_vote_impl(
    const at::Tensor& features, double threshold, const at::Tensor& queries, const at::Tensor& keys,
    const at::Tensor& key_mask, const at::Tensor& active, bool bf16x6) {
  insid3_cpu::check_threshold(threshold, "cluster_and_vote");
  const at::Tensor X = insid3_cpu::linkage_features(features, "cluster_and_vote");
  insid3_cpu::NnVoteJob job(queries, keys, key_mask, active, "cluster_and_vote");
  const insid3_cpu::MaybeReleaseGIL no_gil;
  const int64_t n = X.size(0), A = job.active_count();
  insid3_cpu::HugeBuffer D = insid3_cpu::cosine_distances_condensed(X, "cluster_and_vote", bf16x6);

  std::vector<insid3_cpu::Merge> merges;
  // The overlap relies on ATen and the BLAS running sequentially inside an OpenMP region.
  const int threads = AT_PARALLEL_OPENMP ? at::get_num_threads() : 1;
  if (threads < 2 || A == 0) {
    merges = insid3_cpu::nn_chain_average(D.data(), n);
    job.run_all();
  } else {
    std::atomic<int64_t> next{0};
    insid3_cpu::OmpError error;  // the chain and the GEMMs allocate: caught here, rethrown below
#pragma omp parallel num_threads(threads)
    {
      try {
        if (omp_get_thread_num() == 0) merges = insid3_cpu::nn_chain_average(D.data(), n);
        for (int64_t a0 = next.fetch_add(kRange); a0 < A; a0 = next.fetch_add(kRange))
          job.run(a0, std::min(kRange, A - a0));
      } catch (...) {
        error.capture();
        next.store(A);  // the other threads stop at their next range
      }
    }
    error.rethrow();
  }
  at::Tensor labels = insid3_cpu::cut_labels(merges, n, threshold, features.options());
  return {labels, job.votes, job.argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_and_vote_cpu(
    const at::Tensor& features, double threshold, const at::Tensor& queries, const at::Tensor& keys,
    const at::Tensor& key_mask, const at::Tensor& active, bool bf16x6) {
  return insid3_cpu::guard_alloc("cluster_and_vote", [&] {
    return cluster_and_vote_impl(features, threshold, queries, keys, key_mask, active, bf16x6);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(insid3_fast, CPU, m) { m.impl("cluster_and_vote", &cluster_and_vote_cpu); }
