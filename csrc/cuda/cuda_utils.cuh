// Small device helpers shared by the CUDA kernels of insid3_fast (header only, all inline).
#pragma once
#include <cstdint>
#include <cmath>
#include <cuda_runtime.h>
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <utility>

#include "common/exact_dot.h"
#include "common/input_rules.h"
#include "common/linkage.h"

// Kernel launches and registrations go through these macros so that the same sources also
// build for the CPU emulation of the tests (tests/cuda_emu, which defines INSID3_CUDA_EMU and
// force-includes its cuda_emu.h): there a launch runs the kernel's blocks on the CPU and the
// kernels register under the CPU key of the library insid3_fast_emu, beside the CPU kernels.
#if defined(INSID3_CUDA_EMU)
#define INSID3_LAUNCH(kernel, grid, block, smem, stream) \
  ::cuda_emu::launcher(#kernel, __FILE__ ":" CUDA_EMU_STR(__LINE__), kernel, grid, block, smem, stream)
#define INSID3_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(insid3_fast_emu, CPU, m)
// A host-side constant the emulated tests may shrink (e.g. to force several chunks).
#define INSID3_TUNABLE(name, value) ::cuda_emu::tunable(name, value)
#else
#define INSID3_TUNABLE(name, value) (value)
#define INSID3_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define INSID3_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(insid3_fast, CUDA, m)
#endif

namespace insid3_cuda {

constexpr int kWarp = 32;

// Is t on the device these kernels run on (a CUDA device; the CPU in the emulation)?
inline bool on_device(const at::Tensor& t) {
#if defined(INSID3_CUDA_EMU)
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid sizes are host-known (shapes only): no kernel reads a device value to size a launch.
inline unsigned int grid_1d(int64_t n, int threads) {
  const int64_t g = ceil_div(n, threads);
  return static_cast<unsigned int>(g < 1 ? 1 : (g > 2147483647LL ? 2147483647LL : g));
}

inline void check_cuda_tensor(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                              int64_t dim) {
  TORCH_CHECK(on_device(t), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

// Is the current stream being captured into a CUDA graph? Then no host read is possible.
// (currentStreamCaptureStatusMayInitCtx is in every torch the package supports; the
// isStreamCapturingMayInitCtx shorthand only from 2.12.)
inline bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// True, in every thread of the block, for the block of the grid that finishes last: the
// threadfence pattern of the CUDA samples. No block waits for another, so the grid may run
// one block at a time (as the emulation's OS-thread mode does) and a step that needs the whole
// grid's results joins the launch instead of costing one of its own. *done is 0 at launch and
// the last block sets it back to 0 for the next one. Every thread of every block calls it; what
// the last block reads of the other blocks' writes it reads through volatile pointers.
__device__ __forceinline__ bool last_block_done(int32_t* done) {
  __shared__ int last;
  __threadfence();  // this thread's writes are visible device-wide before its block's ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    const int32_t blocks = static_cast<int32_t>(gridDim.x * gridDim.y * gridDim.z);
    last = atomicAdd(done, 1) == blocks - 1;
    if (last) atomicExch(done, 0);
  }
  __syncthreads();
  const bool mine = last != 0;
  if (mine) __threadfence();
  return mine;
}

// The input rules of common/input_rules.h over device memory, one host read each (a scalar
// holding both maxima). While the stream is being captured into a CUDA graph nothing is read: the
// inputs are the caller's to validate before capture (the pipeline's features come from the
// backbone), and the kernels' device rule applies: a NaN never wins a comparison, so it never
// merges, nor becomes an argmax it does not tie.

// max |x| of two float tensors in one launch, as float bit patterns: for x >= 0 the order of the
// patterns is the order of the values, inf is 0x7f800000 and every NaN lies above it, so a NaN
// anywhere makes the maximum a NaN (as torch's max(abs) would). scratch: three zeroed ints (the
// two maxima, the last-block ticket); the last block packs both maxima into *packed, so that the
// host reads them with one scalar read. (In an anonymous namespace: each translation unit that
// includes this header has its own copy.)
namespace {
__global__ void absmax_bits_kernel(const float* __restrict__ a, int64_t na, const float* __restrict__ b,
                                   int64_t nb, unsigned int* scratch, int64_t* packed) {
  unsigned int m[2] = {0u, 0u};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; x < na + nb; x += stride) {
    const unsigned int v = __float_as_uint(fabsf(x < na ? a[x] : b[x - na]));
    unsigned int& mine = m[x < na ? 0 : 1];
    mine = v > mine ? v : mine;
  }
  // Warp maxima, then one atomic per warp (no shared memory: a few thousand atomics at most).
  for (int k = 0; k < 2; ++k) {
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const unsigned int ov = __shfl_down_sync(0xffffffffu, m[k], o);
      m[k] = ov > m[k] ? ov : m[k];
    }
    if (threadIdx.x % kWarp == 0 && m[k]) atomicMax(scratch + k, m[k]);
  }
  if (!last_block_done(reinterpret_cast<int32_t*>(scratch + 2))) return;
  if (threadIdx.x == 0) {
    const volatile unsigned int* v = scratch;
    *packed = static_cast<int64_t>((static_cast<uint64_t>(v[0]) << 32) | v[1]);
  }
}
}  // namespace

// (max|a|, max|b|) of float32 device tensors (either may be empty: 0), in one host read.
inline std::pair<float, float> device_absmax(const at::Tensor& a, const at::Tensor& b) {
  constexpr int threads = 256;
  auto scratch = at::zeros({3}, a.options().dtype(at::kInt));
  auto packed = at::empty({}, a.options().dtype(at::kLong));
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const int64_t n = ac.numel() + bc.numel();
  const unsigned int blocks = grid_1d(std::min<int64_t>(n, int64_t(512) * threads), threads);
  INSID3_LAUNCH(absmax_bits_kernel, blocks, threads, 0, c10::cuda::getCurrentCUDAStream())(
      ac.data_ptr<float>(), ac.numel(), bc.data_ptr<float>(), bc.numel(),
      reinterpret_cast<unsigned int*>(scratch.data_ptr<int32_t>()), packed.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const uint64_t bits = static_cast<uint64_t>(packed.item<int64_t>());  // the one host read
  const uint32_t ba = static_cast<uint32_t>(bits >> 32), bb = static_cast<uint32_t>(bits);
  float fa, fb;
  std::memcpy(&fa, &ba, 4);
  std::memcpy(&fb, &bb, 4);
  return {fa, fb};
}

// max |t| must be finite.
inline void check_finite(const at::Tensor& t, const char* op, const char* arg) {
  if (capturing() || t.numel() == 0) return;
  insid3::require_finite_absmax(device_absmax(t, t.narrow(0, 0, 0)).first, op, arg);
}

// a and b finite, and the dot magnitude rule (insid3::dot_magnitude_ok): both maxima come back
// in one read and the CPU kernels' own host code applies the rule, with their messages.
inline void check_dot_inputs(const at::Tensor& a, const char* arg_a, const at::Tensor& b, const char* arg_b,
                             int64_t C, const char* op) {
  if (capturing()) return;
  const bool same = a.is_same(b);
  const auto [fa, fb_] = device_absmax(a, same ? b.narrow(0, 0, 0) : b);
  const float fb = same ? fa : fb_;
  if (a.numel()) insid3::require_finite_absmax(fa, op, arg_a);
  if (b.numel()) insid3::require_finite_absmax(fb, op, arg_b);
  if (a.numel() == 0 || b.numel() == 0) return;  // no dot product: only the finiteness rule
  insid3::check_dot_magnitude(op, C, fa, fb, arg_a, arg_b);
}

// insid3::average_update with every operation rounded on its own. nvcc contracts
// `nx*a + ny*b` into an fma by default, which the (x86-64 baseline) CPU build and scipy do
// not; the _rn intrinsics are never contracted, so the device value is the CPU value.
__device__ __forceinline__ double average_update_rn(double d_xi, double d_yi, double nx, double ny) {
  return __ddiv_rn(__dadd_rn(__dmul_rn(nx, d_xi), __dmul_rn(ny, d_yi)), __dadd_rn(nx, ny));
}

// ---- block reductions (blockDim.x a multiple of 32, at most 1024) ----------------------------

__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}

// Max over the block; every thread gets the result.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float sh[32];
  const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
  v = warp_max(v);
  __syncthreads();  // sh may still be read from a previous call
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  v = lane < nw ? sh[lane] : -INFINITY;
  v = warp_max(v);  // every warp reduces the partials itself: no third barrier
  return __shfl_sync(0xffffffffu, v, 0);
}

// Pair reductions with the tie rules of exact_dot.h / linkage.h. Because better_max and
// better_min define a total order on (value, index) pairs (NaN values never win), the
// result does not depend on the reduction tree.
template <bool kMax>
__device__ __forceinline__ bool better(double v, int64_t j, double bv, int64_t bj) {
  return kMax ? insid3::better_max(v, j, bv, bj) : insid3::better_min(v, j, bv, bj);
}

template <class Better>
__device__ __forceinline__ void warp_best_by(double& v, int64_t& j, const Better& better) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const double ov = __shfl_down_sync(0xffffffffu, v, o);
    const long long oj = __shfl_down_sync(0xffffffffu, static_cast<long long>(j), o);
    if (better(ov, oj, v, j)) { v = ov; j = oj; }
  }
}

// Best (value, index) pair over the block under the total order `better(v, j, bv, bj)` ("is
// (v, j) better than (bv, bj)"); the result is valid in every thread. Empty contributions must
// be passed as (worst value, INT64_MAX), and `better` must never prefer INT64_MAX.
template <class Better>
__device__ __forceinline__ void block_best_by(double& v, int64_t& j, const Better& better, double worst) {
  __shared__ double shv[32];
  __shared__ long long shj[32];
  const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
  warp_best_by(v, j, better);
  __syncthreads();
  if (lane == 0) { shv[wid] = v; shj[wid] = j; }
  __syncthreads();
  if (lane < nw) { v = shv[lane]; j = shj[lane]; }
  else { v = worst; j = INT64_MAX; }
  warp_best_by(v, j, better);
  v = __shfl_sync(0xffffffffu, v, 0);
  j = __shfl_sync(0xffffffffu, static_cast<long long>(j), 0);
}

template <bool kMax>
struct PairBetter {
  __device__ __forceinline__ bool operator()(double v, int64_t j, double bv, int64_t bj) const {
    return better<kMax>(v, j, bv, bj);
  }
};

// block_best_by with the tie rules of exact_dot.h / linkage.h (largest / smallest value,
// ties to the lowest index). Empty contributions: (kMax ? -inf : +inf, INT64_MAX).
template <bool kMax>
__device__ __forceinline__ void block_best(double& v, int64_t& j) {
  block_best_by(v, j, PairBetter<kMax>{}, kMax ? -INFINITY : INFINITY);
}


// The merge counters of a chunk of `rounds` clustering rounds plus the tail kernel's counter:
// counts[r + 1] = merges of round r, counts[0] = 1 ("the previous round merged"),
// counts[rounds + 1] is the tail's scratch and counts[rounds + 2] the last-block ticket counter
// (last_block_done). Every round kernel of round r exits at once when counts[r] == 0, so rounds
// after convergence cost only their launches.
inline int64_t round_count_slots(int rounds) { return static_cast<int64_t>(rounds) + 3; }

// Every named input on the first one's device (the op's kernels run there, on its stream);
// e.g. check_same_device(op, {{"a", &a}, {"b", &b}}).
inline void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  const auto& first = *args.begin();
  for (const auto& arg : args) {
    TORCH_CHECK(arg.second->device() == first.second->device(), op, ": all inputs must be on the same device; ",
                first.first, " is on ", first.second->device(), ", ", arg.first, " on ", arg.second->device());
  }
}

// out (float32, written in place, any row stride) = a @ b for bf16 a (M, K) and b (K, P) (views of
// any BLAS-compatible strides): on the device the tensor cores, float32 accumulation and output
// (aten::mm.dtype_out: no bf16 partial sums whatever cuBLAS's process-wide reduction flag says,
// so no call has to change it). `scope` names the GEMM for the profiler (benchmarks/gpu_counters.py
// counts each scope as one bf16 GEMM).
inline void bf16_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const char* scope) {
  RECORD_FUNCTION(scope, std::vector<c10::IValue>());
#if defined(INSID3_CUDA_EMU)
  // A float32 GEMM of the same (bf16-exact) values: exact products, float32 sums, as on the device
  // (in another order there). The float32 copies are the emulation's, not the device's (not metered).
  const cuda_emu::EmulationScratch scratch;
  at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
#else
  at::mm_out(out, a, b, at::kFloat);
#endif
}

// Entry x of the counters' initial value (an op's own init kernel sets them: no extra launch).
__device__ __forceinline__ void round_counts_init(int32_t* counts, int64_t x) { counts[x] = x == 0 ? 1 : 0; }

// Labels numbered by first appearance from a parent forest whose roots are the smallest
// member of their cluster (both clustering ops merge into the lower index), so a cluster
// first appears at its root and its label is the number of roots before it. Defined in
// average_linkage.cu. parent: (N,) int32 on the device, parent[root] == root.
at::Tensor labels_from_parent(const at::Tensor& parent);

}  // namespace insid3_cuda
