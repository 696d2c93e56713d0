// Input checks and error plumbing of the CPU kernels. The rules themselves (sizes, finiteness,
// magnitudes, thresholds) are common/input_rules.h, shared with the CUDA kernels; here:
//  * finite_absmax: the finiteness rule over CPU memory;
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
#include "common/input_rules.h"

namespace insid3_cpu {

using insid3::check_dot_magnitude;
using insid3::check_threshold;
using insid3::checked_mul;


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
  insid3::require_finite_absmax(finite ? m : NAN, op, arg);
  return m;
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
