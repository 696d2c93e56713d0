// CUDA kernel of insid3_fast::nn_vote: reverse nearest-neighbour voting with an exact argmax.
//
// Exactness rule (shared with csrc/cpu): float32 GEMM scores, then every key whose float32
// score is within fp32_dot_error_bound of the best one is re-scored in double with
// insid3::dot_f32_as_f64 (one sequential sum, same order as the CPU) and the winner is picked
// with insid3::better_max (largest double, ties to the lowest index). Both backends therefore
// return the argmax of the same double scores, whatever rounding their GEMMs had.
//
// No host synchronisation: all launch sizes depend on shapes only; inactive queries are
// scored too (cheaper than a data-dependent gather, which would need a sync) and masked.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include "cuda/cuda_utils.cuh"

namespace insid3_cuda {
namespace {

constexpr int kArgmaxThreads = 256;
constexpr int kVoteThreads = 256;
// Budget of the float32 score buffer (elements): 2^25 floats = 128 MiB per query tile.
constexpr int64_t kScoreBudget = int64_t(1) << 25;

// One block per (query of the tile, shot). scores: (T, S*M) row-major, row t = query q0 + t.
__global__ void __launch_bounds__(kArgmaxThreads)
nn_argmax_kernel(const float* __restrict__ scores, const float* __restrict__ queries,
                 const float* __restrict__ keys, const bool* __restrict__ active,
                 const float* __restrict__ qnorm, const float* __restrict__ knorm_max, float extra_rel,
                 int64_t q0, int64_t Q, int64_t S, int64_t M, int64_t C, int64_t* __restrict__ argmax) {
  const int64_t t = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t q = q0 + t;
  if (!active[q]) {  // uniform over the block: no barrier is skipped by only some threads
    if (threadIdx.x == 0) argmax[s * Q + q] = -1;
    return;
  }
  const float* row = scores + t * (S * M) + s * M;

  // 1. float32 max. Same value as the CPU's sequential `best = s[0]; best = s[j] > best ?
  //    s[j] : best`: the max of the non-NaN scores, or NaN when s[0] is NaN (then nothing
  //    passes the cut and, as on the CPU, index 0 is returned).
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) m = fmaxf(m, row[j]);
  m = block_max(m);
  if (isnan(row[0])) m = NAN;

  // 2. Candidates: every key whose float32 score may hide the exact best one. The cut is in
  //    double, as on the CPU, so it adds no rounding of its own.
  const float nq = qnorm[q], nk = knorm_max[s];
  const double cut = static_cast<double>(m) - static_cast<double>(insid3::fp32_dot_error_bound(nq, nk, C)) -
                     static_cast<double>(extra_rel * nq * nk);

  // 3. Double re-score of the candidates (usually 1-3; one thread per candidate, since the
  //    sum must be sequential to match the CPU bit for bit) and block-wide better_max.
  double bv = -INFINITY;
  int64_t bj = INT64_MAX;  // "none yet": better_max accepts any non-NaN candidate over it
  const float* qv = queries + q * C;
  const float* ks = keys + s * M * C;
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    if (static_cast<double>(row[j]) >= cut) {
      const double v = insid3::dot_f32_as_f64(qv, ks + j * C, C);
      if (insid3::better_max(v, j, bv, bj)) { bv = v; bj = j; }
    }
  }
  block_best<true>(bv, bj);
  // No candidate (only with NaN scores): index 0, like the CPU kernel.
  if (threadIdx.x == 0) argmax[s * Q + q] = (bj == INT64_MAX) ? 0 : bj;
}

// out[r] = float(sqrt(sum_k v[r][k]^2)) with the sum in double, in order: exactly the CPU's norm.
__global__ void row_norm_kernel(const float* __restrict__ v, int64_t rows, int64_t C, float* __restrict__ out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const float* x = v + r * C;
  out[r] = static_cast<float>(sqrt(insid3::dot_f32_as_f64(x, x, C)));
}

// votes[q] = number of shots whose argmax lies inside that shot's mask (0 when inactive).
__global__ void nn_votes_kernel(const int64_t* __restrict__ argmax, const bool* __restrict__ key_mask,
                                const bool* __restrict__ active, int64_t Q, int64_t S, int64_t M,
                                int32_t* __restrict__ votes) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= Q) return;
  int32_t v = 0;
  if (active[q]) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t a = argmax[s * Q + q];  // coalesced over q
      if (a >= 0 && key_mask[s * M + a]) ++v;
    }
  }
  votes[q] = v;
}

// Is a reduced-precision float32 matmul (TF32 / BF16) allowed globally? We disable it for our
// GEMM with at::NoTF32Guard, but in case a backend path ignores the guard the error bound is
// widened to cover inputs rounded to bf16 (relative error 2^-7 each, truncated), so the
// candidate set still contains the exact best key: slower, never wrong.
bool reduced_precision_matmul_allowed() {
  auto& ctx = at::globalContext();
  auto reduced = [](at::Float32Precision p) {
    return p == at::Float32Precision::TF32 || p == at::Float32Precision::BF16;
  };
  return reduced(ctx.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL)) ||
         reduced(ctx.float32Precision(at::Float32Backend::CUDA, at::Float32Op::ALL)) ||
         reduced(ctx.float32Precision(at::Float32Backend::GENERIC, at::Float32Op::ALL));
}

std::tuple<at::Tensor, at::Tensor> nn_vote_cuda(const at::Tensor& queries, const at::Tensor& keys,
                                                const at::Tensor& key_mask, const at::Tensor& active) {
  constexpr const char* op = "insid3_fast::nn_vote (CUDA)";
  check_cuda_tensor(queries, op, "queries", at::kFloat, 2);
  check_cuda_tensor(keys, op, "keys", at::kFloat, 3);
  check_cuda_tensor(key_mask, op, "key_mask", at::kBool, 2);
  check_cuda_tensor(active, op, "active", at::kBool, 1);
  const auto dev = queries.device();
  TORCH_CHECK(keys.device() == dev && key_mask.device() == dev && active.device() == dev, op,
              ": all inputs must be on the same device; got queries ", dev, ", keys ", keys.device(),
              ", key_mask ", key_mask.device(), ", active ", active.device());
  const int64_t Q = queries.size(0), C = queries.size(1);
  const int64_t S = keys.size(0), M = keys.size(1);
  TORCH_CHECK(keys.size(2) == C, op, ": keys (S, M, C) must have C = ", C, ", got shape ", keys.sizes());
  TORCH_CHECK(key_mask.size(0) == S && key_mask.size(1) == M, op, ": key_mask must be (S, M) = (", S, ", ",
              M, "), got ", key_mask.sizes());
  TORCH_CHECK(active.size(0) == Q, op, ": active must be (Q,) = (", Q, ",), got ", active.sizes());
  TORCH_CHECK(S <= 65535, op, ": at most 65535 shots are supported, got ", S);
  TORCH_CHECK(M > 0 || S == 0, op, ": every shot needs at least one key (M = 0)");  // as the CPU kernel

  c10::cuda::CUDAGuard guard(dev);
  const auto q = queries.contiguous();
  const auto k = keys.contiguous();
  const auto km = key_mask.contiguous();
  const auto act = active.contiguous();

  auto votes = at::zeros({Q}, queries.options().dtype(at::kInt));
  auto argmax = at::full({S, Q}, -1, queries.options().dtype(at::kLong));
  if (Q == 0 || S == 0) return {votes, argmax};

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float extra_rel = reduced_precision_matmul_allowed() ? 2.0f * (1.0f / 64.0f + 1.0f / 4096.0f) : 0.0f;

  // Norms exactly as the CPU computes them (only the size of the candidate set depends on
  // them, never the selected index, but equal norms make the two backends easier to compare).
  auto qnorm = at::empty({Q}, queries.options());
  auto knorm_all = at::empty({S, M}, queries.options());
  INSID3_LAUNCH(row_norm_kernel, grid_1d(Q, kVoteThreads), kVoteThreads, 0, stream)(q.data_ptr<float>(), Q, C,
                                                                          qnorm.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  INSID3_LAUNCH(row_norm_kernel, grid_1d(S * M, kVoteThreads), kVoteThreads, 0, stream)(k.data_ptr<float>(), S * M, C,
                                                                              knorm_all.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // (S,) max key norm per shot. The CPU folds with fmax from 0, which skips NaN norms; amax
  // would propagate them (NaN cut -> argmax 0 for the whole shot), so NaN norms count as 0.
  knorm_all.masked_fill_(at::isnan(knorm_all), 0.0f);
  const auto knorm = at::amax(knorm_all, at::IntArrayRef{1}).contiguous();
  const auto keys2d_t = k.view({S * M, C}).t();  // (C, S*M), a view: cuBLAS handles the transpose

  const int64_t row = S * M;
  int64_t tile = INSID3_TUNABLE("nn_vote.score_budget", kScoreBudget) / row;
  tile = std::max<int64_t>(1, std::min<int64_t>(tile, Q));
  auto scores = at::empty({tile, row}, queries.options());

  for (int64_t q0 = 0; q0 < Q; q0 += tile) {  // trip count from shapes only
    const int64_t T = std::min(tile, Q - q0);
    auto sc = scores.narrow(0, 0, T);  // contiguous: the first T rows
    {
      at::NoTF32Guard no_tf32;  // plain IEEE float32 GEMM, which the error bound assumes
      at::mm_out(sc, q.narrow(0, q0, T), keys2d_t);
    }
    dim3 grid(static_cast<unsigned int>(T), static_cast<unsigned int>(S));
    INSID3_LAUNCH(nn_argmax_kernel, grid, kArgmaxThreads, 0, stream)(
        sc.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(), act.data_ptr<bool>(),
        qnorm.data_ptr<float>(), knorm.data_ptr<float>(), extra_rel, q0, Q, S, M, C, argmax.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  INSID3_LAUNCH(nn_votes_kernel, grid_1d(Q, kVoteThreads), kVoteThreads, 0, stream)(
      argmax.data_ptr<int64_t>(), km.data_ptr<bool>(), act.data_ptr<bool>(), Q, S, M, votes.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {votes, argmax};
}

}  // namespace
}  // namespace insid3_cuda

INSID3_CUDA_LIBRARY_IMPL(m) {
  m.impl("nn_vote", &insid3_cuda::nn_vote_cuda);
}
