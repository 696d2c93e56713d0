// Schemas of every insid3_fast op, in one place, and the composite kernel of cluster_and_vote
// for devices without a kernel of their own. Host code only.
//
// The schemas are a function of the library so that the CUDA emulation of the tests
// (tests/cuda_emu) can define the same ops under its own namespace, insid3_fast_emu.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace insid3 {

inline void define_ops(torch::Library& m) {
  // Reverse nearest-neighbour voting. queries (Q, C), keys (S, M, C) float32,
  // key_mask (S, M) bool, active (Q,) bool. For every active query q and shot s,
  // argmax[s, q] = argmax_j <keys[s, j], queries[q]> (exact, ties to the lowest j);
  // votes[q] = number of shots whose argmax falls inside key_mask[s]. Inactive
  // queries get argmax -1 and 0 votes.
  m.def("nn_vote(Tensor queries, Tensor keys, Tensor key_mask, Tensor active) -> (Tensor votes, Tensor argmax)");
  // Exact average linkage on a precomputed (N, N) float32 distance matrix, cut so
  // that every merge with linkage distance < threshold is made. Labels (N,) int64,
  // numbered by first appearance.
  m.def("average_linkage_precomputed(Tensor dist, float threshold) -> Tensor");
  // Same on L2-normalised features (N, C): dist = 1 - clamp(X X^T, -1, 1) in float32; with
  // bf16x6 the Gram matrix X X^T is the split-bf16 product of common/bf16x6.h.
  m.def("average_linkage(Tensor features, float threshold, bool bf16x6=False) -> Tensor");
  // average_linkage(features, threshold) and nn_vote(queries, keys, key_mask, active) in one
  // call: (labels, votes, argmax), equal to the two ops'. The CPU kernel overlaps the sequential
  // clustering with the voting; elsewhere the composite below runs the two ops in a row.
  m.def("cluster_and_vote(Tensor features, float threshold, Tensor queries, Tensor keys, "
        "Tensor key_mask, Tensor active, bool bf16x6=False) -> (Tensor labels, Tensor votes, Tensor argmax)");
  // Connectivity-constrained average linkage on an h x w grid (4 or 8 neighbours),
  // reciprocal-nearest-neighbour rounds on the true average distance.
  m.def("grid_average_linkage(Tensor features, int h, int w, int connectivity, float threshold) -> Tensor");
  // Seed selection and aggregation (SPEC step 7): labels (N,) int64 in [0, N), candidates (N,)
  // bool, feats_deb (N, D), feats (N, C), sim (N,), prototype (D,) float32 -> the (N,) bool
  // patch mask. A CUDA kernel only: on the CPU the wrapper runs ATen's ops (the reference).
  // a @ b for float32 a (M, K), b (K, P) as the split-bf16 product of common/bf16x6.h: (M, P)
  // float32, equal on every backend up to the GEMM's summation order (bit for bit between the
  // CPU kernel and the emulated CUDA one). A row of a or column of b with a non-finite entry
  // gives NaN.
  m.def("bf16x6_mm(Tensor a, Tensor b) -> Tensor");
  m.def("aggregate_clusters(Tensor labels, Tensor candidates, Tensor feats_deb, Tensor feats, Tensor sim, "
        "Tensor prototype, float merge_threshold) -> Tensor");
}

// cluster_and_vote as the two ops of library `Ns` one after the other (on a GPU both already
// fill the device, so there is nothing to overlap). Registered as CompositeExplicitAutograd:
// backends with a kernel of their own (the CPU) keep it.
template <const char* Ns>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_and_vote_composite(
    const at::Tensor& features, double threshold, const at::Tensor& queries, const at::Tensor& keys,
    const at::Tensor& key_mask, const at::Tensor& active, bool bf16x6) {
  static const auto linkage = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow((std::string(Ns) + "::average_linkage").c_str(), "")
                                  .typed<at::Tensor(const at::Tensor&, double, bool)>();
  static const auto vote = c10::Dispatcher::singleton()
                               .findSchemaOrThrow((std::string(Ns) + "::nn_vote").c_str(), "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&, const at::Tensor&)>();
  at::Tensor labels = linkage.call(features, threshold, bf16x6);
  auto [votes, argmax] = vote.call(queries, keys, key_mask, active);
  return {labels, votes, argmax};
}

}  // namespace insid3
