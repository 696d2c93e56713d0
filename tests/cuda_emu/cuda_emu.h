// cuda_emu: CUDA's execution model on the CPU, for tests only (never part of the package).
//
// The unchanged bodies of csrc/cuda/*.cu compile with g++ against this header (it is
// force-included before each file) and run on CPU tensors:
//  * a launch runs a grid of blocks; the threads of a block run concurrently, as fibers that
//    switch only at synchronisation points (default), or as one OS thread each (the mode built
//    for ThreadSanitizer / AddressSanitizer: -DCUDA_EMU_OS_THREADS);
//  * __syncthreads is a block barrier; __shfl*_sync a real 32-lane exchange; atomics are real
//    atomics (blocks run on several OS threads in the fiber mode); __shared__ variables are one
//    instance per running block; the _rn intrinsics are single IEEE operations (the build uses
//    -ffp-contract=off, so nothing is fused behind them);
//  * the classic GPU bugs are errors (a c10::Error naming the kernel, block and thread), never
//    hangs: a barrier reached by only part of a block or two different barriers, a shuffle whose
//    mask excludes a calling lane or names a lane that does not call it, a shuffle reading a lane
//    outside the mask or an exited one, launch configurations beyond the hardware (block > 1024
//    threads or > (1024, 1024, 64), grid y/z > 65535, x > 2^31-1, dynamic shared memory > 48 KiB),
//    and blocks over a kernel's __launch_bounds__ (register_kernel below).
// Static __shared__ memory over 48 KiB is a compile error of the real toolchain (ptxas); the
// tests prove that on a toy kernel with nvcc, since g++ cannot size a kernel's statics.
// The host side of the launchers runs as it is: the shims in include/ make CUDAGuard and
// streams no-ops and route cuBLAS work (at::mm on "device" tensors) to the CPU GEMM.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#include <cuda_runtime.h>  // the shim in include/: dim3, cudaStream_t

#define INSID3_CUDA_EMU 1

// ---- qualifiers --------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#if defined(CUDA_EMU_OS_THREADS)
// Blocks run one at a time, their threads on OS threads: one instance is one per block.
#define __shared__ static
#else
// Blocks run concurrently on the worker threads, each block's fibers on one worker.
#define __shared__ static thread_local
#endif

namespace cuda_emu {

struct Launch;

// The CUDA thread running on this OS thread (fiber mode: the fiber switched in).
struct Thread {
  dim3 thread_idx;
  dim3 block_idx;
  const Launch* launch;
  int linear;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
};

struct Launch {
  const char* kernel;
  const char* site;  // file:line of the launch
  dim3 grid, block;
  size_t dynamic_smem;
  const void* fn;  // the kernel's address: its __launch_bounds__ (register_kernel)
};

// Every kernel of a translation unit, with the maximum block size of its __launch_bounds__ (0:
// it declares none), registered at load by code that tests/cuda_emu/build.py generates from
// the sources (the macro itself expands to nothing here). A launch of more threads than the
// bound is refused, as a GPU refuses it; so is a launch of more than 256 threads of a kernel
// without one (ptxas may give it up to 255 registers a thread, more than 65536 per block
// allow, and then a GPU fails the launch: cudaErrorLaunchOutOfResources); and a launch of a
// kernel nobody registered (the scan missed it).
void register_kernel(const void* fn, const char* name, long max_threads);

// The CUDA thread running on this OS thread, read inline by threadIdx & co. (initial-exec TLS:
// one pointer, no __tls_get_addr call per access).
extern thread_local Thread* tls_current __attribute__((tls_model("initial-exec")));
[[noreturn]] void outside_kernel();  // aborts with a clear message
inline Thread* current() {
  Thread* t = tls_current;
  if (__builtin_expect(t == nullptr, 0)) outside_kernel();
  return t;
}

// Block barrier; file/line identify the barrier (two different ones reached together is an error).
void syncthreads(const char* file, int line);

enum class ShflKind { Idx, Up, Down, Xor };
// One lane's part of a warp exchange of 8-byte payloads; returns the source lane's payload.
uint64_t shfl(unsigned mask, uint64_t payload, ShflKind kind, int arg, int width, const char* file, int line);

template <class T>
inline T shfl_typed(unsigned mask, T v, ShflKind kind, int arg, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle payloads are at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl(mask, bits, kind, arg, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Runs `body` once per CUDA thread of the launch; throws c10::Error on a detected bug.
void run(const Launch& launch, const std::function<void()>& body);

// Kernel launches made since the extension loaded (the counters of the tests).
uint64_t launch_count();
// Pretend the current stream is being captured into a CUDA graph (forces that branch).
void set_capturing(bool on);
bool capturing();
// Host-side constants the tests may shrink (INSID3_TUNABLE in csrc/cuda): `value` unless the
// test set `name`. set_tunable(name, -1) restores the default.
int64_t tunable(const char* name, int64_t value);
void set_tunable(const char* name, int64_t value);

// While one lives on this thread, tensors allocated here are the emulation's own scratch (e.g.
// float32 copies of bf16 operands for the CPU GEMM), not tensors the device would hold: the
// peak meter of emu_peak_begin does not see them. Create and drop them inside the scope.
class EmulationScratch {
 public:
  EmulationScratch();
  ~EmulationScratch();
  EmulationScratch(const EmulationScratch&) = delete;
  EmulationScratch& operator=(const EmulationScratch&) = delete;

 private:
  bool hidden_ = false;
};

template <class Kernel>
struct Launcher {
  const char* kernel;
  const char* site;
  Kernel* fn;
  dim3 grid, block;
  size_t smem;
  template <class... Args>
  void operator()(Args&&... args) const {
    Kernel* f = fn;
    // Every CUDA thread gets its own copy of the arguments, as a real launch does.
    auto body = [f, args...]() { f(args...); };
    run(Launch{kernel, site, grid, block, smem, reinterpret_cast<const void*>(f)}, body);
  }
};

template <class Kernel>
Launcher<Kernel> launcher(const char* kernel, const char* site, Kernel* fn, dim3 grid, dim3 block, size_t smem,
                          cudaStream_t) {
  return Launcher<Kernel>{kernel, site, fn, grid, block, smem};
}

}  // namespace cuda_emu

// ---- built-in variables and functions ------------------------------------------------------
#define threadIdx (::cuda_emu::current()->thread_idx)
#define blockIdx (::cuda_emu::current()->block_idx)
#define blockDim (::cuda_emu::current()->launch->block)
#define gridDim (::cuda_emu::current()->launch->grid)
#define warpSize 32
#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)

#define CUDA_EMU_STR2(x) #x
#define CUDA_EMU_STR(x) CUDA_EMU_STR2(x)
#define __shfl_sync(mask, v, src, ...) \
  ::cuda_emu::shfl_typed(mask, v, ::cuda_emu::ShflKind::Idx, src, ::cuda_emu::width_or_32(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
  ::cuda_emu::shfl_typed(mask, v, ::cuda_emu::ShflKind::Up, d, ::cuda_emu::width_or_32(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::cuda_emu::shfl_typed(mask, v, ::cuda_emu::ShflKind::Down, d, ::cuda_emu::width_or_32(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...) \
  ::cuda_emu::shfl_typed(mask, v, ::cuda_emu::ShflKind::Xor, m, ::cuda_emu::width_or_32(__VA_ARGS__), __FILE__, __LINE__)

namespace cuda_emu {
constexpr int width_or_32() { return 32; }
constexpr int width_or_32(int w) { return w; }
}  // namespace cuda_emu

// Atomics: relaxed, like CUDA's (device scope, no ordering of other accesses).
template <class T>
inline T atomicAdd(T* p, T v) {
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
  } else {
    T old;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    T desired = old + v;
    while (!__atomic_compare_exchange(p, &old, &desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) desired = old + v;
    return old;
  }
}
template <class T>
inline T atomicMin(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
  return old;
}
template <class T>
inline T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v > old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
  return old;
}
template <class T>
inline T atomicCAS(T* p, T expected, T desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return expected;
}
template <class T>
inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Intrinsics. Each _rn operation is one IEEE operation in round-to-nearest (the default mode);
// the build passes -ffp-contract=off so no multiply-add is fused across them.
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline long long __double_as_longlong(double d) { long long v; std::memcpy(&v, &d, 8); return v; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline unsigned int __float_as_uint(float f) { unsigned int v; std::memcpy(&v, &f, 4); return v; }
inline float __uint_as_float(unsigned int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
template <class T>
inline T __ldg(const T* p) { return *p; }

using std::isnan;
using std::isinf;
using std::isfinite;
