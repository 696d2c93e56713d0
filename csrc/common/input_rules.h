// The input rules every backend applies, in one place (host code; csrc/cpu and csrc/cuda).
//
// Every error is a c10::Error (RuntimeError in Python) whose message starts with the op's name:
//  * sizes: every product of sizes is computed with an overflow check (checked_mul);
//  * non-finite input: "<op>: <argument> must be finite (found NaN or inf)" (finite_message);
//  * dot products that could overflow float32: rejected unless
//    C * max|a| * max|b| < 2^100 (insid3::kMaxDotMagnitude), see check_dot_magnitude;
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
// amax_a and amax_b) that could overflow float32: C * amax_a * amax_b must be < 2^100
// (insid3::kMaxDotMagnitude; computed in double, in this order, on every backend).
inline void check_dot_magnitude(const char* op, int64_t C, float amax_a, float amax_b, const char* a,
                                const char* b) {
  const double v = static_cast<double>(C) * static_cast<double>(amax_a) * static_cast<double>(amax_b);
  if (v < insid3::kMaxDotMagnitude) return;
  const char* tail = " must be below 2^100 (about 1.27e30) so that float32 dot products cannot overflow; L2-normalise them";
  TORCH_CHECK(std::strcmp(a, b) != 0, op, ": ", a, " are too large: C * max|", a, "|^2 = ", v, tail);
  TORCH_CHECK(false, op, ": ", a, " and ", b, " are too large: C * max|", a, "| * max|", b, "| = ", v, tail);
}

inline void check_threshold(double threshold, const char* op) {
  TORCH_CHECK(!std::isnan(threshold), op, ": threshold must not be NaN");
}

}  // namespace insid3
