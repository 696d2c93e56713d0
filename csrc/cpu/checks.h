// Input checks and error plumbing shared by the CPU kernels.
//
// Every error is a c10::Error (RuntimeError in Python) whose message starts with the op's name:
//  * sizes: every product of sizes is computed with an overflow check (checked_mul);
//  * non-finite input: "<op>: <argument> must be finite (found NaN or inf)";
//  * dot products that could overflow float32: rejected unless max|a|, max|b| and
//    C * max|a| * max|b| are below 2^100 (insid3::kMaxDotMagnitude), see check_dot_magnitude;
//  * threshold NaN: "<op>: threshold must not be NaN";
//  * allocation failure: c10::OutOfMemoryError (torch.OutOfMemoryError, a RuntimeError),
//    "<op>: out of memory (...)", via guard_alloc at the kernel's entry.
// An exception must never leave an OpenMP region (it would abort the process): regions that can
// throw catch into an OmpError and rethrow after the region.
#pragma once
#include <ATen/ATen.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <exception>
#include <new>
#include <stdexcept>
#include <utility>

#include "common/exact_dot.h"

namespace insid3_cpu {

// a * b for sizes (a, b >= 0), or an error naming what overflows int64.
inline int64_t checked_mul(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, &r), op, ": ", what, " (", a, " * ", b,
              ") overflows int64");
  return r;
}

// The first exception thrown inside an OpenMP region, rethrown by the caller after the region.
class OmpError {
 public:
  // Call from a catch (...) block inside the region.
  void capture() {
#pragma omp critical(insid3_omp_error)
    if (!error_) error_ = std::current_exception();
    failed_.store(true, std::memory_order_relaxed);
  }
  // Whether some thread failed (the others may skip their remaining work).
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  // After the region.
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::exception_ptr error_;
  std::atomic<bool> failed_{false};
};

// max |x| over a float32 tensor, or an error if an element is NaN or inf.
inline float finite_absmax(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kFloat);
  const at::Tensor dense = t.is_non_overlapping_and_dense() ? t : t.contiguous();
  const float* p = dense.data_ptr<float>();
  const int64_t n = t.numel();
  float m = 0.f;
  bool finite = true;
#pragma omp parallel for reduction(max : m) reduction(&& : finite) if (n > (int64_t(1) << 16))
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(p[i]);
    finite = finite && a <= FLT_MAX;  // false for NaN and inf
    m = a > m ? a : m;
  }
  TORCH_CHECK(finite, op, ": ", arg, " must be finite (found NaN or inf)");
  return m;
}

// Rejects dot products of length C between vectors of arguments `a` and `b` (entries up to
// amax_a and amax_b) that could overflow: max|a|, max|b| and C * max|a| * max|b| must all be
// below 2^100 (insid3::kMaxDotMagnitude; in double, in this order, on every backend). The
// product bounds every float32 partial sum; the entries bound the bf16 rounding of the inputs
// (FLT_MAX rounds to inf in bf16, and inf times a subnormal flushed to zero is NaN).
inline void check_dot_magnitude(const char* op, int64_t C, float amax_a, float amax_b, const char* a,
                                const char* b) {
  const double v = static_cast<double>(C) * static_cast<double>(amax_a) * static_cast<double>(amax_b);
  const double lim = insid3::kMaxDotMagnitude;
  if (v < lim && amax_a < lim && amax_b < lim) return;
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

// Is this c10::Error torch's CPU allocator failing (it is not an OutOfMemoryError)?
inline bool is_cpu_alloc_failure(const c10::Error& e) {
  const char* m = e.what_without_backtrace();
  return std::strstr(m, "DefaultCPUAllocator") != nullptr &&
         (std::strstr(m, "can't allocate memory") != nullptr || std::strstr(m, "not enough memory") != nullptr);
}

// Runs a kernel body, turning an allocation failure (std::bad_alloc, std::length_error from a
// too large container, torch's CPU allocator) into torch's OutOfMemoryError with the op's name.
template <typename F>
auto guard_alloc(const char* op, F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const c10::OutOfMemoryError&) {
    throw;
  } catch (const c10::Error& e) {
    if (!is_cpu_alloc_failure(e)) throw;
    TORCH_CHECK_WITH(OutOfMemoryError, false, op, ": out of memory (", e.what_without_backtrace(),
                     "); try a smaller input or free memory");
  } catch (const std::bad_alloc& e) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, op, ": out of memory (", e.what(),
                     "); try a smaller input or free memory");
  } catch (const std::length_error& e) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, op, ": out of memory (", e.what(),
                     "); try a smaller input or free memory");
  }
}

}  // namespace insid3_cpu
