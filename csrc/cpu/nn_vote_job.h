// The CPU reverse nearest-neighbour vote as a job over ranges of active queries.
//
// A job validates and prepares its inputs once (active rows, norms, bf16 copies), then
// run(a0, T) scores active queries [a0, a0 + T) against every shot: one GEMM per shot
// (at::mm), then each query compares every key within a rigorous error bound of its best score
// with the cascade of common/exact_dot.h, so the argmax is canonical (largest exact real dot
// product of the float32 values, ties to the lowest index) and the same as the CUDA kernel's.
// Disjoint ranges may run on different threads.
//
// Input rule (the same on every backend): queries and keys must be finite, with max|queries|,
// max|keys| and C * max|queries| * max|keys| below 2^100, so no float32 (or bf16) dot product
// can overflow; anything else is rejected with an error naming the op and the argument (checks.h).
//
// On CPUs with native bf16 dot products (AVX512-BF16) the GEMM runs on bf16-rounded inputs,
// about 2.4x faster; every key within bf16_dot_error_bound of the best bf16 score then enters
// the cascade with a float32 re-score as its first level.
// INSID3_NN_VOTE=fp32 (or bf16) forces a mode; the default is bf16 where supported.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/exact_dot.h"
#include "cpu/checks.h"

namespace insid3_cpu {

inline bool nn_vote_uses_bf16() {
  const char* mode = std::getenv("INSID3_NN_VOTE");
  if (mode != nullptr && std::strcmp(mode, "fp32") == 0) return false;
  if (mode != nullptr && std::strcmp(mode, "bf16") == 0) return true;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// A float32 dot in 16 independent lanes (vectorisable); any summation order stays within
// fp32_dot_error_bound.
inline float dot_f32(const float* a, const float* b, int64_t C) {
  float lanes[16] = {0.f};
  int64_t k = 0;
  for (; k + 16 <= C; k += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += a[k + l] * b[k + l];
  float acc = 0.f;
  for (int l = 0; l < 16; ++l) acc += lanes[l];
  for (; k < C; ++k) acc += a[k] * b[k];
  return acc;
}

inline double norm_f64(const float* v, int64_t C) { return std::sqrt(insid3::dot_f32_as_f64(v, v, C)); }

// The exact argmax (largest exact dot, ties to the lowest index; see common/exact_dot.h) from
// one row of GEMM scores (float32, or bf16 with a float32 stage). Keys are visited in index
// order; each candidate is compared with the best so far by the cascade float32 score ->
// double dot -> exact sign, so no list of candidates is kept (memory O(1), however many keys
// tie). q_norm and key_norm_max are the double norms of the query and of the shot's longest key.
template <typename Score>
int64_t exact_argmax(const Score* scores, const float* q, const float* keys, int64_t M, int64_t C,
                     double q_norm, double key_norm_max) {
  float best = static_cast<float>(scores[0]);
  for (int64_t j = 1; j < M; ++j) {
    const float v = static_cast<float>(scores[j]);
    best = v > best ? v : best;
  }
  constexpr bool kBf16 = std::is_same_v<Score, at::BFloat16>;
  const float qn = static_cast<float>(q_norm), kn = static_cast<float>(key_norm_max);
  const double gemm_bound = kBf16 ? insid3::bf16_dot_error_bound(qn, kn, C) : insid3::fp32_dot_error_bound(qn, kn, C);
  const double b32 = insid3::fp32_dot_error_bound(qn, kn, C);
  const double b64 = insid3::fp64_dot_error_bound(q_norm, key_norm_max, C);
  // In double so the cut itself adds no rounding (it matters for tiny C).
  const double cut = static_cast<double>(best) - gemm_bound;
  int64_t bj = -1;
  float bv32 = 0.f;
  double bv64 = 0.0;
  bool have64 = false;
  for (int64_t j = 0; j < M; ++j) {
    const float s = static_cast<float>(scores[j]);
    if (!(static_cast<double>(s) >= cut)) continue;
    const float* kj = keys + j * C;
    const float v32 = kBf16 ? dot_f32(kj, q, C) : s;
    if (bj >= 0) {  // j > bj: j wins only if its exact dot is strictly larger
      const double d32 = static_cast<double>(v32) - static_cast<double>(bv32);
      if (d32 < -b32) continue;
      if (!(d32 > b32)) {
        if (!have64) bv64 = insid3::dot_f32_as_f64(keys + bj * C, q, C), have64 = true;
        const double v64 = insid3::dot_f32_as_f64(kj, q, C);
        const double d64 = v64 - bv64;
        if (d64 < -b64) continue;
        if (!(d64 > b64)) {
          if (std::memcmp(kj, keys + bj * C, static_cast<size_t>(C) * sizeof(float)) == 0) continue;
          if (insid3::exact_dot_cmp(q, kj, keys + bj * C, C) <= 0) continue;
        }
        bj = j, bv32 = v32, bv64 = v64;
        continue;
      }
    }
    bj = j, bv32 = v32, have64 = false;
  }
  return bj < 0 ? 0 : bj;  // bj >= 0 always: the best score passes its own cut
}

class NnVoteJob {
 public:
  // Validates the inputs of insid3_fast::nn_vote and allocates its outputs (votes 0, argmax -1).
  // `op` names the op in error messages.
  NnVoteJob(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& key_mask,
            const at::Tensor& active, const char* op = "nn_vote") {
    TORCH_CHECK(queries.device().is_cpu() && keys.device().is_cpu() && key_mask.device().is_cpu() &&
                    active.device().is_cpu(),
                op, " (CPU): all inputs must be CPU tensors");
    TORCH_CHECK(queries.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat,
                op, ": queries and keys must be float32, got ", queries.scalar_type(), " and ",
                keys.scalar_type());
    TORCH_CHECK(key_mask.scalar_type() == at::kBool && active.scalar_type() == at::kBool,
                op, ": key_mask and active must be bool, got ", key_mask.scalar_type(), " and ",
                active.scalar_type());
    TORCH_CHECK(queries.dim() == 2, op, ": queries must be (Q, C), got ", queries.sizes());
    TORCH_CHECK(keys.dim() == 3 && keys.size(2) == queries.size(1),
                op, ": keys must be (S, M, C) with C = ", queries.size(1), ", got ", keys.sizes());
    TORCH_CHECK(key_mask.dim() == 2 && key_mask.size(0) == keys.size(0) && key_mask.size(1) == keys.size(1),
                op, ": key_mask must be (S, M) = (", keys.size(0), ", ", keys.size(1), "), got ",
                key_mask.sizes());
    TORCH_CHECK(active.dim() == 1 && active.size(0) == queries.size(0), op, ": active must be (Q,) = (",
                queries.size(0), ",), got ", active.sizes());
    Q_ = queries.size(0);
    C_ = queries.size(1);
    S_ = keys.size(0);
    M_ = keys.size(1);
    TORCH_CHECK(M_ > 0 || S_ == 0, op, ": every shot needs at least one key (M = 0)");
    TORCH_CHECK(S_ <= INT32_MAX, op, ": at most 2^31 - 1 shots (votes are int32), got S = ", S_);
    checked_mul(S_, Q_, op, "the argmax size S * Q");

    q_ = queries.contiguous();
    k_ = keys.contiguous();
    m_ = key_mask.contiguous();
    // Non-finite input is rejected, and so are magnitudes whose float32 dots could overflow.
    const float q_max = finite_absmax(q_, op, "queries");
    const float k_max = finite_absmax(k_, op, "keys");
    check_dot_magnitude(op, C_, q_max, k_max, "queries", "keys");
    votes = at::zeros({Q_}, queries.options().dtype(at::kInt));
    argmax = at::full({S_, Q_}, -1, queries.options().dtype(at::kLong));

    const at::Tensor a_c = active.contiguous();
    const bool* act = a_c.data_ptr<bool>();
    for (int64_t q = 0; q < Q_; ++q)
      if (act[q]) idx_.push_back(q);
    if (active_count() == 0 || S_ == 0) return;

    const float* kp = k_.data_ptr<float>();
    key_norm_max_.assign(S_, 0.0);
    for (int64_t s = 0; s < S_; ++s) {
      double mx = 0.0;
      for (int64_t j = 0; j < M_; ++j) mx = std::fmax(mx, norm_f64(kp + (s * M_ + j) * C_, C_));
      key_norm_max_[s] = mx;
    }
    const float* qp = q_.data_ptr<float>();
    q_norm_.resize(idx_.size());
    for (size_t a = 0; a < idx_.size(); ++a) q_norm_[a] = norm_f64(qp + idx_[a] * C_, C_);
    const at::Tensor idx_t = at::from_blob(idx_.data(), {active_count()}, at::kLong);
    q_act_ = q_.index_select(0, idx_t);  // (A, C), active rows only
    bf16_ = nn_vote_uses_bf16();
    if (bf16_) {
      q_act_ = q_act_.to(at::kBFloat16);
      k_gemm_ = k_.to(at::kBFloat16);
    } else {
      k_gemm_ = k_;
    }
  }

  // Number of active queries: run() takes ranges of [0, active_count()).
  int64_t active_count() const { return static_cast<int64_t>(idx_.size()); }

  // Rows per GEMM that keep the scores near 16 MB, at least 256 (smaller GEMMs re-pack the
  // keys too often).
  int64_t tile() const {
    constexpr int64_t kTileScores = int64_t(1) << 22, kMinTile = 256;
    return std::max<int64_t>(1, std::min(active_count(), std::max(kMinTile, kTileScores / std::max<int64_t>(M_, 1))));
  }

  // Scores every active query, tile by tile, with the caller's OpenMP team.
  void run_all() {
    const int64_t A = active_count(), T = tile();
    for (int64_t a0 = 0; a0 < A; a0 += T) run(a0, std::min(T, A - a0));
  }

  // Scores active queries [a0, a0 + T) against every shot and records their argmax and votes.
  // The GEMM and the per-query loop use the OpenMP team of the caller (one thread when called
  // inside a parallel region). Nothing in the per-query loop allocates; an exception there
  // would still be caught in the region and rethrown after it.
  void run(int64_t a0, int64_t T) {
    if (T <= 0 || S_ == 0) return;
    const float* qp = q_.data_ptr<float>();
    const float* kp = k_.data_ptr<float>();
    const bool* mp = m_.data_ptr<bool>();
    int32_t* vp = votes.data_ptr<int32_t>();
    int64_t* ap = argmax.data_ptr<int64_t>();
    const at::Tensor q_tile = q_act_.narrow(0, a0, T);
    for (int64_t s = 0; s < S_; ++s) {
      const at::Tensor scores = at::mm(q_tile, k_gemm_.select(0, s).t()).contiguous();
      const float* ks = kp + s * M_ * C_;
      const at::BFloat16* sb = bf16_ ? scores.data_ptr<at::BFloat16>() : nullptr;
      const float* sf = bf16_ ? nullptr : scores.data_ptr<float>();
      OmpError error;
#pragma omp parallel for schedule(dynamic, 8)
      for (int64_t t = 0; t < T; ++t) {
        try {
          const int64_t q = idx_[a0 + t];
          const double qn = q_norm_[a0 + t], kn = key_norm_max_[s];
          const int64_t j = sb != nullptr ? exact_argmax(sb + t * M_, qp + q * C_, ks, M_, C_, qn, kn)
                                          : exact_argmax(sf + t * M_, qp + q * C_, ks, M_, C_, qn, kn);
          ap[s * Q_ + q] = j;
          vp[q] += mp[s * M_ + j] ? 1 : 0;  // one thread owns query q for the whole shot loop
        } catch (...) {
          error.capture();
        }
      }
      error.rethrow();
    }
  }

  at::Tensor votes, argmax;

 private:
  int64_t Q_ = 0, C_ = 0, S_ = 0, M_ = 0;
  bool bf16_ = false;
  at::Tensor q_, k_, m_, q_act_, k_gemm_;
  std::vector<int64_t> idx_;
  std::vector<double> q_norm_, key_norm_max_;
};

}  // namespace insid3_cpu
