// CUDA kernel of insid3_fast::cluster_and_vote: the two ops one after the other on the current
// stream. (The CPU kernel overlaps them because its clustering is sequential; on the GPU both
// already fill the device.) Host code only; no synchronisation.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_and_vote_cuda(
    const at::Tensor& features, double threshold, const at::Tensor& queries, const at::Tensor& keys,
    const at::Tensor& key_mask, const at::Tensor& active) {
  static const auto linkage = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("insid3_fast::average_linkage", "")
                                  .typed<at::Tensor(const at::Tensor&, double)>();
  static const auto vote = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("insid3_fast::nn_vote", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&, const at::Tensor&)>();
  at::Tensor labels = linkage.call(features, threshold);
  auto [votes, argmax] = vote.call(queries, keys, key_mask, active);
  return {labels, votes, argmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(insid3_fast, CUDA, m) { m.impl("cluster_and_vote", &cluster_and_vote_cuda); }
