// Toy kernels for the detector proofs of the emulation (tests/test_emu_toys.py): one correct
// kernel that uses every primitive, and one deliberately broken kernel per class of GPU bug.
// Built only into the emulated test extension. insid3_fast_emu::toy(name, out) launches one.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda/cuda_utils.cuh"

namespace {

// Correct: block sum of out[i] = i with warp shuffles and shared memory; out[0] = the sum.
__global__ void toy_block_sum(float* out, int n) {
  __shared__ float partial[32];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  float v = t < n ? out[t] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) out[0] = v;
  }
}

// Racy: every thread writes the same shared word, then thread 0 reads it; no barrier between.
__global__ void toy_racy(float* out, int) {
  __shared__ float word;
  word = static_cast<float>(threadIdx.x);
  if (threadIdx.x == 0) out[0] = word;
}

// Divergent barrier: only the first half of the block reaches __syncthreads.
__global__ void toy_divergent_barrier(float* out, int) {
  if (threadIdx.x < blockDim.x / 2) {
    __syncthreads();
    out[threadIdx.x] = 1.0f;
  }
}

// Two different barriers: even threads wait at one, odd threads at another.
__global__ void toy_two_barriers(float* out, int) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Bad mask: all 32 lanes shuffle, but the mask names only the lower 16.
__global__ void toy_bad_mask(float* out, int) {
  const float v = __shfl_down_sync(0x0000ffffu, out[threadIdx.x], 1);
  out[threadIdx.x] = v;
}

// Two shuffles in one exchange: the lower half shuffles at one line, the upper half at another,
// with the same full mask (a GPU is not bound to pair them).
__global__ void toy_two_shuffles(float* out, int) {
  const float x = out[threadIdx.x];
  float v;
  if (threadIdx.x < 16) {
    v = __shfl_xor_sync(0xffffffffu, x, 16);
  } else {
    v = __shfl_xor_sync(0xffffffffu, x, 16);
  }
  out[threadIdx.x] = v;
}

// Exited lane: the upper half returns, the lower half shuffles with a full mask.
__global__ void toy_exited_lane(float* out, int) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, out[threadIdx.x], 0);
}

// Reads outside the mask: lanes 0-15 shuffle among themselves but read lane 20.
__global__ void toy_read_outside_mask(float* out, int) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, out[threadIdx.x], 20);
}

// Out of bounds: the last thread writes one element past the end of out.
__global__ void toy_out_of_bounds(float* out, int n) { out[threadIdx.x + 1 == blockDim.x ? n : threadIdx.x] = 1.0f; }

// Never ends: every thread waits for a flag nobody sets (a GPU would hang). The OS-thread
// mode's watchdog must turn it into a message and a stop.
__global__ void toy_spin(float* out, int) {
  while (*static_cast<volatile float*>(out) == 0.0f) {
  }
}

// Correct, and bounded: __launch_bounds__ caps its blocks at kToyBound threads (a GPU refuses a
// launch of more; the emulation reads the bound from this source, see tests/cuda_emu/kernel_scan.py).
constexpr int kToyBound = 64;
template <int kScale>
__global__ void __launch_bounds__(kToyBound, 1) toy_bounded(float* out, int n) {
  if (static_cast<int>(threadIdx.x) < n) out[threadIdx.x] *= static_cast<float>(kScale);
}

void toy(const std::string& name, const at::Tensor& out) {
  TORCH_CHECK(out.is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous(), "toy: out must be float32");
  float* p = out.data_ptr<float>();
  const int n = static_cast<int>(out.numel());
  cudaStream_t s = nullptr;
  if (name == "block_sum") INSID3_LAUNCH(toy_block_sum, 1, 256, 0, s)(p, n);
  else if (name == "racy") INSID3_LAUNCH(toy_racy, 1, 64, 0, s)(p, n);
  else if (name == "divergent_barrier") INSID3_LAUNCH(toy_divergent_barrier, 2, 64, 0, s)(p, n);
  else if (name == "two_barriers") INSID3_LAUNCH(toy_two_barriers, 1, 64, 0, s)(p, n);
  else if (name == "bad_mask") INSID3_LAUNCH(toy_bad_mask, 1, 32, 0, s)(p, n);
  else if (name == "two_shuffles") INSID3_LAUNCH(toy_two_shuffles, 1, 32, 0, s)(p, n);
  else if (name == "exited_lane") INSID3_LAUNCH(toy_exited_lane, 1, 32, 0, s)(p, n);
  else if (name == "read_outside_mask") INSID3_LAUNCH(toy_read_outside_mask, 1, 32, 0, s)(p, n);
  else if (name == "out_of_bounds") INSID3_LAUNCH(toy_out_of_bounds, 1, n, 0, s)(p, n);
  else if (name == "spin") INSID3_LAUNCH(toy_spin, 1, 32, 0, s)(p, n);
  else if (name == "block_too_large") INSID3_LAUNCH(toy_block_sum, 1, 1025, 0, s)(p, n);
  else if (name == "grid_y_too_large") INSID3_LAUNCH(toy_block_sum, dim3(1, 65536), 32, 0, s)(p, n);
  else if (name == "dynamic_smem_too_large") INSID3_LAUNCH(toy_block_sum, 1, 32, 49 * 1024, s)(p, n);
  else if (name == "within_bounds") INSID3_LAUNCH(toy_bounded<2>, 1, kToyBound, 0, s)(p, n);
  else if (name == "over_bounds") INSID3_LAUNCH(toy_bounded<2>, 1, 2 * kToyBound, 0, s)(p, n);
  else if (name == "unbounded_over_256") INSID3_LAUNCH(toy_block_sum, 1, 512, 0, s)(p, n);
  else TORCH_CHECK(false, "toy: unknown kernel ", name);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(insid3_fast_emu, m) { m.def("toy(str name, Tensor(a!) out) -> ()"); }
TORCH_LIBRARY_IMPL(insid3_fast_emu, CPU, m) { m.impl("toy", &toy); }
