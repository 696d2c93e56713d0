// CPU kernel of insid3_fast::nn_vote: reverse nearest-neighbour voting with an exact argmax.
//
// Active queries are processed in tiles; per tile and shot one float32 GEMM (at::mm) scores
// every key, then each query keeps its best fp32 score and re-scores in double every key
// within fp32_dot_error_bound of it (exact_dot.h), so the argmax is canonical (largest exact
// dot, ties to the lowest index) and the same as the CUDA kernel's. Memory: O(tile * M).
//
// On CPUs with native bf16 dot products (AVX512-BF16) the GEMM runs on bf16-rounded inputs,
// about 2.4x faster; every key within bf16_dot_error_bound of the best bf16 score is then
// re-scored in float32, and those within the float32 bound of the best of them in double.
// Each window is a rigorous error bound, so the result is the same canonical argmax.
// INSID3_NN_VOTE=fp32 (or bf16) forces a mode; the default is bf16 where supported.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "common/exact_dot.h"

namespace {

// Tile of active queries: about 16 MB of scores, at least 256 rows (small GEMMs waste time
// re-packing the keys).
constexpr int64_t kTileScores = int64_t(1) << 22;
constexpr int64_t kMinTile = 256;

bool use_bf16_gemm() {
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
float dot_f32(const float* a, const float* b, int64_t C) {
  float lanes[16] = {0.f};
  int64_t k = 0;
  for (; k + 16 <= C; k += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += a[k + l] * b[k + l];
  float acc = 0.f;
  for (int l = 0; l < 16; ++l) acc += lanes[l];
  for (; k < C; ++k) acc += a[k] * b[k];
  return acc;
}

// The exact argmax from bf16 GEMM scores: bf16 window, then float32 window, then double.
int64_t exact_argmax_bf16(const at::BFloat16* scores, const float* q, const float* keys, int64_t M,
                          int64_t C, float q_norm, float key_norm_max,
                          std::vector<std::pair<float, int64_t>>& cands) {
  float best = static_cast<float>(scores[0]);
  for (int64_t j = 1; j < M; ++j) {
    const float v = static_cast<float>(scores[j]);
    best = v > best ? v : best;
  }
  const double cut = static_cast<double>(best) - insid3::bf16_dot_error_bound(q_norm, key_norm_max, C);
  cands.clear();
  float best32 = -INFINITY;
  for (int64_t j = 0; j < M; ++j) {
    if (!(static_cast<double>(static_cast<float>(scores[j])) >= cut)) continue;
    const float v = dot_f32(keys + j * C, q, C);
    cands.emplace_back(v, j);
    best32 = v > best32 ? v : best32;
  }
  const double cut32 = static_cast<double>(best32) - insid3::fp32_dot_error_bound(q_norm, key_norm_max, C);
  double best_v = -INFINITY;
  int64_t best_j = -1;
  for (const auto& [v32, j] : cands) {
    if (!(static_cast<double>(v32) >= cut32)) continue;
    const double v = insid3::dot_f32_as_f64(keys + j * C, q, C);
    if (best_j < 0 || insid3::better_max(v, j, best_v, best_j)) {
      best_v = v;
      best_j = j;
    }
  }
  return best_j < 0 ? 0 : best_j;
}

double norm_f64(const float* v, int64_t C) { return std::sqrt(insid3::dot_f32_as_f64(v, v, C)); }

// Index of the exact argmax of <keys[j], q> among M keys, given the fp32 scores row.
int64_t exact_argmax(const float* scores, const float* q, const float* keys, int64_t M, int64_t C,
                     float q_norm, float key_norm_max) {
  float best = scores[0];
  for (int64_t j = 1; j < M; ++j) best = scores[j] > best ? scores[j] : best;
  // In double so the cut itself adds no rounding (it matters for tiny C). Extra candidates
  // never change the result; NaN scores never pass and leave index 0.
  const double cut = static_cast<double>(best) - insid3::fp32_dot_error_bound(q_norm, key_norm_max, C);
  double best_v = -INFINITY;
  int64_t best_j = -1;
  for (int64_t j = 0; j < M; ++j) {
    if (!(static_cast<double>(scores[j]) >= cut)) continue;
    const double v = insid3::dot_f32_as_f64(keys + j * C, q, C);
    if (best_j < 0 || insid3::better_max(v, j, best_v, best_j)) {
      best_v = v;
      best_j = j;
    }
  }
  return best_j < 0 ? 0 : best_j;
}

std::tuple<at::Tensor, at::Tensor> nn_vote_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                               const at::Tensor& key_mask, const at::Tensor& active) {
  TORCH_CHECK(queries.device().is_cpu() && keys.device().is_cpu() && key_mask.device().is_cpu() &&
                  active.device().is_cpu(),
              "nn_vote (CPU): all inputs must be CPU tensors");
  TORCH_CHECK(queries.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat,
              "nn_vote: queries and keys must be float32, got ", queries.scalar_type(), " and ",
              keys.scalar_type());
  TORCH_CHECK(key_mask.scalar_type() == at::kBool && active.scalar_type() == at::kBool,
              "nn_vote: key_mask and active must be bool, got ", key_mask.scalar_type(), " and ",
              active.scalar_type());
  TORCH_CHECK(queries.dim() == 2, "nn_vote: queries must be (Q, C), got ", queries.sizes());
  TORCH_CHECK(keys.dim() == 3 && keys.size(2) == queries.size(1),
              "nn_vote: keys must be (S, M, C) with C = ", queries.size(1), ", got ", keys.sizes());
  TORCH_CHECK(key_mask.dim() == 2 && key_mask.size(0) == keys.size(0) && key_mask.size(1) == keys.size(1),
              "nn_vote: key_mask must be (S, M) = (", keys.size(0), ", ", keys.size(1), "), got ",
              key_mask.sizes());
  TORCH_CHECK(active.dim() == 1 && active.size(0) == queries.size(0), "nn_vote: active must be (Q,) = (",
              queries.size(0), ",), got ", active.sizes());
  const int64_t Q = queries.size(0), C = queries.size(1), S = keys.size(0), M = keys.size(1);
  TORCH_CHECK(M > 0 || S == 0, "nn_vote: every shot needs at least one key (M = 0)");

  const at::Tensor q_c = queries.contiguous(), k_c = keys.contiguous();
  const at::Tensor m_c = key_mask.contiguous(), a_c = active.contiguous();
  at::Tensor votes = at::zeros({Q}, queries.options().dtype(at::kInt));
  at::Tensor argmax = at::full({S, Q}, -1, queries.options().dtype(at::kLong));

  const bool* act = a_c.data_ptr<bool>();
  std::vector<int64_t> idx;
  for (int64_t q = 0; q < Q; ++q)
    if (act[q]) idx.push_back(q);
  const int64_t A = static_cast<int64_t>(idx.size());
  if (A == 0 || S == 0) return {votes, argmax};

  const float* qp = q_c.data_ptr<float>();
  const float* kp = k_c.data_ptr<float>();
  const bool* mp = m_c.data_ptr<bool>();
  int32_t* vp = votes.data_ptr<int32_t>();
  int64_t* ap = argmax.data_ptr<int64_t>();

  std::vector<float> key_norm_max(S, 0.f);
  for (int64_t s = 0; s < S; ++s) {
    double mx = 0.0;
    for (int64_t j = 0; j < M; ++j) mx = std::fmax(mx, norm_f64(kp + (s * M + j) * C, C));
    key_norm_max[s] = static_cast<float>(mx);
  }
  const at::Tensor idx_t = at::from_blob(idx.data(), {A}, at::kLong);
  const at::Tensor q_act = q_c.index_select(0, idx_t);  // (A, C), active rows only
  std::vector<float> q_norm(A);
  for (int64_t a = 0; a < A; ++a) q_norm[a] = static_cast<float>(norm_f64(qp + idx[a] * C, C));

  const int64_t tile = std::min(A, std::max(kMinTile, kTileScores / std::max<int64_t>(M, 1)));
  if (use_bf16_gemm()) {
    const at::Tensor q_b = q_act.to(at::kBFloat16);
    const at::Tensor k_b = k_c.to(at::kBFloat16);
    for (int64_t t0 = 0; t0 < A; t0 += tile) {
      const int64_t T = std::min(tile, A - t0);
      for (int64_t s = 0; s < S; ++s) {
        const at::Tensor tile_scores = at::mm(q_b.narrow(0, t0, T), k_b.select(0, s).t()).contiguous();
        const at::BFloat16* sp = tile_scores.data_ptr<at::BFloat16>();
        const float* ks = kp + s * M * C;
#pragma omp parallel
        {
          std::vector<std::pair<float, int64_t>> cands;
#pragma omp for schedule(dynamic, 8)
          for (int64_t t = 0; t < T; ++t) {
            const int64_t q = idx[t0 + t];
            const int64_t j = exact_argmax_bf16(sp + t * M, qp + q * C, ks, M, C, q_norm[t0 + t],
                                                key_norm_max[s], cands);
            ap[s * Q + q] = j;
            vp[q] += mp[s * M + j] ? 1 : 0;
          }
        }
      }
    }
    return {votes, argmax};
  }
  at::Tensor scores = at::empty({tile, M}, queries.options());
  for (int64_t t0 = 0; t0 < A; t0 += tile) {
    const int64_t T = std::min(tile, A - t0);
    at::Tensor tile_scores = scores.narrow(0, 0, T);
    for (int64_t s = 0; s < S; ++s) {
      at::mm_out(tile_scores, q_act.narrow(0, t0, T), k_c.select(0, s).t());
      const float* sp = tile_scores.data_ptr<float>();
      const float* ks = kp + s * M * C;
#pragma omp parallel for schedule(dynamic, 8)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t q = idx[t0 + t];
        const int64_t j = exact_argmax(sp + t * M, qp + q * C, ks, M, C, q_norm[t0 + t], key_norm_max[s]);
        ap[s * Q + q] = j;
        vp[q] += mp[s * M + j] ? 1 : 0;  // one thread owns query q for the whole shot loop body
      }
    }
  }
  return {votes, argmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(insid3_fast, CPU, m) { m.impl("nn_vote", &nn_vote_cpu); }
