// CUDA kernel of insid3_fast::nn_vote: reverse nearest-neighbour voting with an exact argmax.
//
// Exactness rule (common/exact_dot.h, the CPU kernel's): the argmax of the EXACT real dot
// products of the float32 values, ties to the lowest index. A GEMM scores every key: by
// default on bf16 copies of the inputs with float32 accumulation and output (the tensor cores,
// bf16_gemm), with INSID3_NN_VOTE=fp32 in plain float32. Only keys
// within the GEMM's rigorous error bound (bf16_dot_error_bound, fp32_dot_error_bound) of the
// best score can be the exact argmax. Each
// candidate is re-scored in double (insid3::dot_f32_as_f64); two candidates whose doubles are
// more than fp64_dot_error_bound apart are ordered by them, closer ones by the exact sign of
// the difference (insid3::exact_dot_cmp). Every comparison is thus exact, the order is total,
// and the block reduction returns the CPU kernel's index whatever the GEMM's rounding.
//
// Input rule (common/input_rules.h): queries and keys finite with C * max|q| * max|k| < 2^100,
// checked with one host read (none under graph capture, see cuda_utils.cuh). Otherwise no host
// synchronisation: all launch sizes depend on shapes only; inactive queries are scored too
// (cheaper than a data-dependent gather, which would need a sync) and masked.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "cuda/cuda_utils.cuh"

namespace insid3_cuda {
namespace {

constexpr int kArgmaxThreads = 256;
constexpr int kVoteThreads = 256;
// Budget of the float32 score buffer (elements): 3 * 2^23 floats = 96 MiB per query tile. At 1024 px
// (N = 4096) one tile for 1 shot, four of 1024 queries for 5, and the voting's peak stays under
// the clustering's (benchmarks/gpu_counters.py: 2^25 raised the 5-shot peak from 1.19 to 1.38 x 8 N^2).
constexpr int64_t kScoreBudget = int64_t(3) << 23;

// The exact order of candidates (v = double dot, j = key index) of one query: larger exact dot
// first, ties to the lower index; (any, INT64_MAX) is "no candidate" and loses to everything.
struct ExactBetter {
  const float* q;
  const float* keys;  // the shot's keys, (M, C)
  int64_t C;
  double b64;         // fp64_dot_error_bound of the query and the shot's longest key
  __device__ __forceinline__ bool operator()(double v, int64_t j, double bv, int64_t bj) const {
    if (j == INT64_MAX) return false;
    if (bj == INT64_MAX) return true;
    const double d = v - bv;
    if (d > b64) return true;
    if (d < -b64) return false;
    const float* kj = keys + j * C;
    const float* kb = keys + bj * C;
    bool same = true;
    for (int64_t k = 0; k < C && same; ++k) same = kj[k] == kb[k];
    const int sign = same ? 0 : insid3::exact_dot_cmp(q, kj, kb, C);
    return sign > 0 || (sign == 0 && j < bj);
  }
};

// One block per (query of the tile, shot). scores: (T, S*M) row-major float32, row t = query
// q0 + t, from a float32 GEMM or (kBf16) a bf16 GEMM with float32 accumulation and output.
// extra_rel: the float32 GEMM's error bound beyond fp32_dot_error_bound, relative to |q| |k|;
// kBf16: the whole bound is insid3::bf16_dot_error_bound (which also covers rounding the score
// to bf16: a margin here, the scores are float32).
template <bool kBf16>
__global__ void __launch_bounds__(kArgmaxThreads)
nn_argmax_kernel(const float* __restrict__ scores, const float* __restrict__ queries,
                 const float* __restrict__ keys, const bool* __restrict__ active,
                 const double* __restrict__ qnorm, const double* __restrict__ knorm_max, float extra_rel,
                 int64_t q0, int64_t Q, int64_t S, int64_t M, int64_t C, int64_t* __restrict__ argmax) {
  const int64_t t = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t q = q0 + t;
  if (!active[q]) {  // uniform over the block: no barrier is skipped by only some threads
    if (threadIdx.x == 0) argmax[s * Q + q] = -1;
    return;
  }
  const float* row = scores + t * (S * M) + s * M;

  // 1. The best GEMM score (finite inputs: no NaN).
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) m = fmaxf(m, row[j]);
  m = block_max(m);

  // 2. Candidates: every key whose float32 score may hide the exact best one. The cut is in
  //    double, as on the CPU, so it adds no rounding of its own.
  const double nq = qnorm[q], nk = knorm_max[s];
  const float nq32 = static_cast<float>(nq), nk32 = static_cast<float>(nk);
  const double bound = kBf16 ? static_cast<double>(insid3::bf16_dot_error_bound(nq32, nk32, C))
                             : static_cast<double>(insid3::fp32_dot_error_bound(nq32, nk32, C)) +
                                   static_cast<double>(extra_rel * nq32 * nk32);
  const double cut = static_cast<double>(m) - bound;

  // 3. Double re-score of the candidates (usually 1-3; one thread per candidate, the sum is
  //    sequential) and the exact order, within each thread and over the block.
  const float* qv = queries + q * C;
  const ExactBetter better{qv, keys + s * M * C, C, insid3::fp64_dot_error_bound(nq, nk, C)};
  double bv = -INFINITY;
  int64_t bj = INT64_MAX;
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    if (static_cast<double>(row[j]) >= cut) {
      const double v = insid3::dot_f32_as_f64(qv, better.keys + j * C, C);
      if (better(v, j, bv, bj)) { bv = v; bj = j; }
    }
  }
  block_best_by(bv, bj, better, -INFINITY);
  // The best score passes its own cut, so there is a candidate (index 0 only for M = 0 guards).
  if (threadIdx.x == 0) argmax[s * Q + q] = (bj == INT64_MAX) ? 0 : bj;
}

// out[r] = sqrt(sum_k v[r][k]^2) with the sum in double, in order: exactly the CPU's norm.
__global__ void row_norm_kernel(const float* __restrict__ v, int64_t rows, int64_t C, double* __restrict__ out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const float* x = v + r * C;
  out[r] = sqrt(insid3::dot_f32_as_f64(x, x, C));
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

// The GEMM's precision: bf16 inputs with float32 accumulation on the tensor cores (default), or
// plain float32 (INSID3_NN_VOTE=fp32, the CPU kernel's variable). Either way the argmax is the
// exact one: only the candidate window (and so the re-scoring work) differs.
bool nn_vote_uses_bf16() {
  const char* mode = std::getenv("INSID3_NN_VOTE");
  return !(mode != nullptr && std::strcmp(mode, "fp32") == 0);
}

std::tuple<at::Tensor, at::Tensor> nn_vote_cuda(const at::Tensor& queries, const at::Tensor& keys,
                                                const at::Tensor& key_mask, const at::Tensor& active) {
  constexpr const char* op = "nn_vote";
  check_cuda_tensor(queries, op, "queries", at::kFloat, 2);
  check_cuda_tensor(keys, op, "keys", at::kFloat, 3);
  check_cuda_tensor(key_mask, op, "key_mask", at::kBool, 2);
  check_cuda_tensor(active, op, "active", at::kBool, 1);
  check_same_device(op, {{"queries", &queries}, {"keys", &keys}, {"key_mask", &key_mask}, {"active", &active}});
  const int64_t Q = queries.size(0), C = queries.size(1);
  const int64_t S = keys.size(0), M = keys.size(1);
  TORCH_CHECK(keys.size(2) == C, op, ": keys (S, M, C) must have C = ", C, ", got shape ", keys.sizes());
  TORCH_CHECK(key_mask.size(0) == S && key_mask.size(1) == M, op, ": key_mask must be (S, M) = (", S, ", ",
              M, "), got ", key_mask.sizes());
  TORCH_CHECK(active.size(0) == Q, op, ": active must be (Q,) = (", Q, ",), got ", active.sizes());
  TORCH_CHECK(S <= 65535, op, ": at most 65535 shots are supported, got ", S);
  TORCH_CHECK(M > 0 || S == 0, op, ": every shot needs at least one key (M = 0)");  // as the CPU kernel
  insid3::checked_mul(S, Q, op, "the argmax size S * Q");
  insid3::checked_mul(S, M, op, "the number of keys S * M");

  c10::cuda::CUDAGuard guard(queries.device());
  const auto q = queries.contiguous();
  const auto k = keys.contiguous();
  const auto km = key_mask.contiguous();
  const auto act = active.contiguous();

  check_dot_inputs(q, "queries", k, "keys", C, op);  // before the early exit, as on the CPU

  auto votes = at::zeros({Q}, queries.options().dtype(at::kInt));
  auto argmax = at::full({S, Q}, -1, queries.options().dtype(at::kLong));
  if (Q == 0 || S == 0) return {votes, argmax};

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float extra_rel = reduced_precision_matmul_allowed() ? 2.0f * (1.0f / 64.0f + 1.0f / 4096.0f) : 0.0f;

  // Norms exactly as the CPU computes them (double): the fp64 stage's error bound needs them;
  // the candidate set's size depends on them, never the selected index.
  auto qnorm = at::empty({Q}, queries.options().dtype(at::kDouble));
  auto knorm_all = at::empty({S, M}, queries.options().dtype(at::kDouble));
  INSID3_LAUNCH(row_norm_kernel, grid_1d(Q, kVoteThreads), kVoteThreads, 0, stream)(q.data_ptr<float>(), Q, C,
                                                                          qnorm.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  INSID3_LAUNCH(row_norm_kernel, grid_1d(S * M, kVoteThreads), kVoteThreads, 0, stream)(k.data_ptr<float>(), S * M, C,
                                                                              knorm_all.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto knorm = at::amax(knorm_all, at::IntArrayRef{1}).contiguous();  // (S,) longest key per shot
  const auto keys2d_t = k.view({S * M, C}).t();  // (C, S*M), a view: cuBLAS handles the transpose

  const int64_t row = S * M;
  int64_t tile = INSID3_TUNABLE("nn_vote.score_budget", kScoreBudget) / row;
  tile = std::max<int64_t>(1, std::min<int64_t>(tile, Q));
  tile = ceil_div(Q, ceil_div(Q, tile));  // as many tiles, of even sizes
  const bool bf16 = nn_vote_uses_bf16();
  // bf16 copies of the inputs for the tensor cores; the re-score reads the float32 values.
  const auto qg = bf16 ? q.to(at::kBFloat16) : q;
  const auto kg_t = bf16 ? k.view({S * M, C}).to(at::kBFloat16).t() : keys2d_t;
  auto scores = at::empty({tile, row}, queries.options());  // float32 either way

  for (int64_t q0 = 0; q0 < Q; q0 += tile) {  // trip count from shapes only
    const int64_t T = std::min(tile, Q - q0);
    auto sc = scores.narrow(0, 0, T);  // contiguous: the first T rows
    dim3 grid(static_cast<unsigned int>(T), static_cast<unsigned int>(S));
    if (bf16) {
      bf16_gemm(sc, qg.narrow(0, q0, T), kg_t, "insid3_fast::bf16_gemm");
      INSID3_LAUNCH(nn_argmax_kernel<true>, grid, kArgmaxThreads, 0, stream)(
          sc.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(), act.data_ptr<bool>(),
          qnorm.data_ptr<double>(), knorm.data_ptr<double>(), 0.0f, q0, Q, S, M, C, argmax.data_ptr<int64_t>());
    } else {
      {
        at::NoTF32Guard no_tf32;  // plain IEEE float32 GEMM, which the error bound assumes
        at::mm_out(sc, qg.narrow(0, q0, T), kg_t);
      }
      INSID3_LAUNCH(nn_argmax_kernel<false>, grid, kArgmaxThreads, 0, stream)(
          sc.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(), act.data_ptr<bool>(),
          qnorm.data_ptr<double>(), knorm.data_ptr<double>(), extra_rel, q0, Q, S, M, C, argmax.data_ptr<int64_t>());
    }
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
