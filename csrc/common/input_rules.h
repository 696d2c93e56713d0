// The input rules every backend applies, in one place (host code; csrc/cpu and csrc/cuda).
//
// Every error is a c10::Error (RuntimeError in Python) whose message starts with the op's name:
//  * sizes: every product of sizes is computed with an overflow check (checked_mul);
//  * non-finite input: "<op>: <argument> must be finite (found NaN or inf)" (finite_message);
//  * dot products that could overflow float32: rejected unless max|a|, max|b| and
//    C * max|a| * max|b| are below 2^100 (insid3::kMaxDotMagnitude), see check_dot_magnitude;
//  * threshold NaN: "<op>: threshold must not be NaN".
#pragma once
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/exact_dot.h"

namespace insid3 {

// a * b for sizes (a, b >= 0), or an error naming what overflows int64.
inline int64_t checked_mul(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, &r), op, ": ", what, " (", a, " * ", b,
              ") overflows int64");
  return r;
}

// The finiteness rule, checked by each backend over its own memory: max |x| must be finite.
inline void require_finite_absmax(float absmax, const char* op, const char* arg) {
  TORCH_CHECK(std::isfinite(absmax), op, ": ", arg, " must be finite (found NaN or inf)");
}

// Rejects dot products of length C between vectors of arguments `a` and `b` (entries up to
// amax_a and amax_b) that could overflow: max|a|, max|b| and C * max|a| * max|b| must all be
// below 2^100 (insid3::kMaxDotMagnitude; in double, in this order, on every backend). The
// product bounds every float32 partial sum; the entries bound the bf16 rounding of the inputs
// (FLT_MAX rounds to inf in bf16, and inf times a subnormal flushed to zero is NaN).
inline bool dot_magnitude_ok(int64_t C, float amax_a, float amax_b) {
  const double v = static_cast<double>(C) * static_cast<double>(amax_a) * static_cast<double>(amax_b);
  const double lim = insid3::kMaxDotMagnitude;
  return v < lim && amax_a < lim && amax_b < lim;
}

inline void check_dot_magnitude(const char* op, int64_t C, float amax_a, float amax_b, const char* a,
                                const char* b) {
  if (dot_magnitude_ok(C, amax_a, amax_b)) return;
  const double v = static_cast<double>(C) * static_cast<double>(amax_a) * static_cast<double>(amax_b);
  const char* tail = " must each be below 2^100 (about 1.27e30) so that float32 dot products cannot overflow; "
                     "L2-normalise them";
  TORCH_CHECK(std::strcmp(a, b) != 0, op, ": ", a, " are too large: max|", a, "| = ", amax_a, " and C * max|", a,
              "|^2 = ", v, tail);
  TORCH_CHECK(false, op, ": ", a, " and ", b, " are too large: max|", a, "| = ", amax_a, ", max|", b, "| = ",
              amax_b, " and C * max|", a, "| * max|", b, "| = ", v, tail);
}

inline void check_threshold(double threshold, const char* op) {
  TORCH_CHECK(!std::isnan(threshold), op, ": threshold must not be NaN");
}

}  // namespace insid3
