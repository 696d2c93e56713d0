// CPU kernel of insid3_fast::nn_vote: reverse nearest-neighbour voting with an exact argmax
// (nn_vote_job.h), active queries in tiles of about 16 MB of scores. Memory: O(tile * M).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/nn_vote_job.h"

namespace {

std::tuple<at::Tensor, at::Tensor> nn_vote_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                               const at::Tensor& key_mask, const at::Tensor& active) {
  return insid3_cpu::guard_alloc("nn_vote", [&]() -> std::tuple<at::Tensor, at::Tensor> {
    insid3_cpu::NnVoteJob job(queries, keys, key_mask, active);
    job.run_all();
    return {job.votes, job.argmax};
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(insid3_fast, CPU, m) { m.impl("nn_vote", &nn_vote_cpu); }
