// Exact-argmax helpers shared by the CPU and CUDA nn_vote kernels.
//
// The rule: argmax_j <keys[j], q> of the EXACT (real-number) dot products of the float32
// values, ties (exactly equal real dots) to the lowest index. No rounding enters the decision,
// so every backend and every summation order gives the same index.
//
// How it is computed cheaply: a fast GEMM (float32, or bf16 inputs with float32 accumulation)
// scores every key; only keys within a rigorous error bound of the best GEMM score can be the
// exact argmax. Among those, pairs are compared with a cascade that stops at the first level
// that separates them: float32 scores (error <= fp32_dot_error_bound), then sequential double
// dots (error <= fp64_dot_error_bound), then the exact sign of the difference (exact_dot_cmp,
// a fixed-point accumulator that no rounding can reach).
//
// The bounds assume finite inputs whose products cannot overflow float32: the kernels reject
// anything with max|q|, max|k| or C * max|q| * max|k| >= 2^100 (kMaxDotMagnitude) before scoring.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include "macros.h"

namespace insid3 {

// Inputs are rejected unless max|queries|, max|keys| and C * max|queries| * max|keys| are all
// below 2^100 (max|features| and C * max|features|^2 for the linkage ops): then no float32
// partial sum of a dot product can overflow, whatever the order (even with every rounding
// upwards, (1 + 2^-24)^C stays far below 2^28 for any C a tensor can have), and the bf16
// rounding of an input cannot overflow either (FLT_MAX itself rounds to inf in bf16).
constexpr double kMaxDotMagnitude = 1267650600228229401496703205376.0;  // 2^100

// Products of two floats are exact in double, so the only rounding is the sequential
// sum; the order (k = 0..C-1) is the same on every backend.
INSID3_HD double dot_f32_as_f64(const float* a, const float* b, int64_t C) {
  double acc = 0.0;
  for (int64_t k = 0; k < C; ++k) acc += static_cast<double>(a[k]) * static_cast<double>(b[k]);
  return acc;
}

// A bound on |fp32 GEMM dot - exact dot| for vectors of norms na, nb and length C
// (gamma_C = C u / (1 - C u), u = 2^-24, applied to sum |a_k b_k| <= na nb), doubled
// because both compared scores carry an error. The factor 1 + 2^-20 covers the rounding of
// the norms and of this bound to float32. The absolute term covers underflow, even with
// denormals flushed to zero (torch.set_flush_denormal): an input below 2^-126 taken as zero
// moves the dot by at most 2^-126 |other factor| (2^-126 sqrt(C) (na + nb) in all), each
// flushed partial sum by at most 2^-126. When C u >= 1/2 the bound is infinite (every key is
// a candidate).
INSID3_HD float fp32_dot_error_bound(float na, float nb, int64_t C) {
  const double u = 5.9604644775390625e-08;  // 2^-24
  const double cu = static_cast<double>(C) * u;
  if (!(cu < 0.5)) return INFINITY;
  const double rel = 2.0 * cu / (1.0 - cu);
  const double n = static_cast<double>(na) + static_cast<double>(nb);
  const double tiny = 0x1p-122 * (sqrt(static_cast<double>(C)) * n + static_cast<double>(C) + 1.0);
  return static_cast<float>((rel * static_cast<double>(na) * static_cast<double>(nb) + tiny) * (1.0 + 0x1p-20)) +
         1e-30f;
}

// The same bound for a GEMM on bf16-rounded inputs with float32 accumulation and a bf16
// result (torch's CPU bf16 matmul): input rounding (2b + b^2, b = 2^-9), accumulation
// (gamma_C), output rounding (b), for both compared scores, with a further factor 2 of
// margin for the GEMM's internals. Inputs below bf16's normal range may be treated as zero
// (AVX512-BF16 does): the absolute term is fp32_dot_error_bound's.
INSID3_HD float bf16_dot_error_bound(float na, float nb, int64_t C) {
  const double b = 1.0 / 512.0;
  const double cu = static_cast<double>(C) * 5.9604644775390625e-08;
  if (!(cu < 0.5)) return INFINITY;
  const double gamma = cu / (1.0 - cu);
  const double in = 2.0 * b + b * b;
  const double rel = in + gamma * (1.0 + in) + b * (1.0 + in) * (1.0 + gamma);
  const double n = static_cast<double>(na) + static_cast<double>(nb);
  const double tiny = 0x1p-122 * (sqrt(static_cast<double>(C)) * n + static_cast<double>(C) + 1.0);
  return static_cast<float>((4.0 * rel * static_cast<double>(na) * static_cast<double>(nb) + tiny) *
                            (1.0 + 0x1p-20)) + 1e-30f;
}

// A bound on |dot_f32_as_f64(q, a) - exact| + |dot_f32_as_f64(q, b) - exact| for |q| <= na,
// |a|, |b| <= nb (norms as computed by sqrt(dot_f32_as_f64(v, v, C))): the products are exact
// and every partial sum is a multiple of 2^-298 (no underflow, even with denormals flushed),
// so only the C - 1 additions round: gamma = C u / (1 - C u), u = 2^-53, times sum |q_k a_k|
// <= |q| |a|. The factor 1 + 3 gamma covers the rounding of the two computed norms.
INSID3_HD double fp64_dot_error_bound(double na, double nb, int64_t C) {
  const double cu = static_cast<double>(C) * 1.1102230246251565e-16;  // 2^-53
  if (!(cu < 0x1p-10)) return INFINITY;
  const double gamma = cu / (1.0 - cu);
  return 2.0 * gamma * (1.0 + 3.0 * gamma + 0x1p-50) * na * nb;
}

// Is (v, j) better than the current best (best_v, best_j)? Larger value wins, ties to the lower index.
INSID3_HD bool better_max(double v, int64_t j, double best_v, int64_t best_j) {
  return v > best_v || (v == best_v && j < best_j);
}

// ---- Exact dot products -------------------------------------------------------------------
// A finite float is m 2^e with an integer |m| < 2^24 and e in [-149, 104], so a product of two
// is an integer below 2^48 times 2^e, e in [-298, 208]. ExactAcc adds such products into a
// fixed-point integer with its lowest bit at 2^-298, in 32-bit digits held in int64 (the digits
// absorb carries lazily; normalize() propagates them). 20 digits (640 bits) hold any sum of up
// to 2^60 products without overflow.
struct ExactAcc {
  static constexpr int kDigits = 20;
  int64_t d[kDigits];
  int64_t pending;  // additions since the last normalisation

  INSID3_HD void clear() {
    for (int i = 0; i < kDigits; ++i) d[i] = 0;
    pending = 0;
  }

  INSID3_HD static uint32_t bits(float x) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(x);
#else
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    return u;
#endif
  }

  // Adds sign * a * b exactly (a, b finite).
  INSID3_HD void add_product(float a, float b, bool negate) {
    const uint32_t ua = bits(a), ub = bits(b);
    const uint32_t ea = (ua >> 23) & 0xFFu, eb = (ub >> 23) & 0xFFu;
    const uint64_t ma = (ua & 0x7FFFFFu) | (ea != 0 ? 0x800000u : 0u);
    const uint64_t mb = (ub & 0x7FFFFFu) | (eb != 0 ? 0x800000u : 0u);
    if (ma == 0 || mb == 0) return;
    // value = ma 2^(max(ea,1) - 150) * mb 2^(max(eb,1) - 150); bit 0 of the accumulator is 2^-298.
    const int shift = static_cast<int>(ea != 0 ? ea : 1) + static_cast<int>(eb != 0 ? eb : 1) - 2;
    const uint64_t p = ma * mb;  // < 2^48
    const int digit = shift >> 5, r = shift & 31;
    const uint64_t lo = (p & 0xFFFFFFFFull) << r;  // < 2^63
    const uint64_t hi = (p >> 32) << r;            // < 2^47
    const int64_t parts[3] = {static_cast<int64_t>(lo & 0xFFFFFFFFull),
                              static_cast<int64_t>((lo >> 32) + (hi & 0xFFFFFFFFull)),
                              static_cast<int64_t>(hi >> 32)};
    const bool neg = negate != (((ua ^ ub) >> 31) != 0);
    for (int i = 0; i < 3; ++i) d[digit + i] += neg ? -parts[i] : parts[i];
    if (++pending == (int64_t(1) << 29)) normalize();
  }

  // Carries every digit into [0, 2^32) except the top one, which keeps the sign.
  INSID3_HD void normalize() {
    for (int i = 0; i + 1 < kDigits; ++i) {
      const int64_t carry = d[i] >> 32;  // floor division (arithmetic shift)
      d[i] -= carry * (int64_t(1) << 32);
      d[i + 1] += carry;
    }
    pending = 0;
  }

  // Sign (-1, 0, 1) of the accumulated value.
  INSID3_HD int sign() {
    normalize();
    if (d[kDigits - 1] != 0) return d[kDigits - 1] < 0 ? -1 : 1;
    for (int i = kDigits - 2; i >= 0; --i)
      if (d[i] != 0) return 1;  // lower digits are non-negative after normalize()
    return 0;
  }
};

// Sign of <q, a> - <q, b> in exact arithmetic (finite float32 inputs of length C).
INSID3_HD int exact_dot_cmp(const float* q, const float* a, const float* b, int64_t C) {
  ExactAcc acc;
  acc.clear();
  for (int64_t k = 0; k < C; ++k) {
    acc.add_product(q[k], a[k], false);
    acc.add_product(q[k], b[k], true);
  }
  return acc.sign();
}

}  // namespace insid3
