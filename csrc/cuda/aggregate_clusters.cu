// CUDA kernel of insid3_fast::aggregate_clusters: seed selection and aggregation (SPEC step 7)
// in three launches, with no host synchronisation (the torch version is ~45 ATen launches).
//
// The math is insid3_fast.torch_kernels.aggregate_clusters (the reference): per cluster l,
// area, candidate count and similarity sum; protos_deb[l] = normalize(mean of feats_deb),
// protos[l] = normalize(mean of feats); the seed is the candidate-holding cluster whose
// <protos_deb, prototype> is largest (torch.argmax's rule: a NaN wins, ties to the lowest
// label; no candidate anywhere: label 0); score[l] = cross[l] * intra[l] * weight[l] with
// cross = sim_sum / area, intra = <protos[l], protos[seed]>, weight = n_match / area (1 for
// the seed); a patch is in the mask when its cluster's score > merge_threshold (compared in
// float32, as torch compares a float32 tensor with a Python float) and some patch is a
// candidate. Sums are float64 and added in ascending patch order, dot products accumulate in
// float64; the float32 values between the steps are the reference's (means, norms, protos).
//   A1 sizes   (one block): patches per label, and the count of out-of-range labels.
//   A2 cluster (one block per label; empty labels exit): the block scans the labels in chunks
//              of kChunk, compacts its members in ascending order, and sums their rows (every thread owns
//              kDimsPerThread dims of [feats_deb | feats]); then norms, protos, cross_proto. The block
//              that finishes last picks the seed and whether any patch is a candidate.
//   A3 mask    (one warp per patch): intra of the patch's cluster, score, mask.
// Labels are any int64 values; the host refuses out-of-range ones with one read (none under
// graph capture, where the kernels skip them: such patches are not in the mask).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/cuda_utils.cuh"

namespace insid3_cuda {
namespace {

constexpr int kSizeThreads = 1024;
constexpr int kClusterThreads = 512;
constexpr int kDimsPerThread = 32;  // D + C <= 512 * 32 = 16384
constexpr int kMaskThreads = 256;
constexpr int kChunk = 64;  // labels scanned per step of the member search (even)

struct AggState {
  const int64_t* labels;  // (N,)
  const bool* cand;       // (N,)
  const float* deb;       // (N, D) contiguous
  const float* feat;      // (N, C), strides (fs0, fs1)
  const float* sim;       // (N,)
  const float* proto;     // (D,)
  int64_t N, D, C, fs0, fs1;
  int32_t* count;       // (N,) patches per label
  float* protos;        // (N, C) protos[l] (rows of non-empty labels)
  float* cross;         // (N,)
  float* weight;        // (N,)
  float* cross_proto;   // (N,)
  int32_t* n_match;     // (N,)
  int64_t* status;      // [0] out-of-range labels, [1] seed, [2] any candidate, [3] last-block ticket
  double* scratch;      // (N, kScratch) cluster_kernel's per-block scratch
};

__device__ __forceinline__ bool label_ok(int64_t l, int64_t N) { return l >= 0 && l < N; }

__global__ void __launch_bounds__(kSizeThreads) sizes_kernel(AggState st) {
  const int64_t t = threadIdx.x, T = blockDim.x;
  for (int64_t l = t; l < st.N; l += T) st.count[l] = 0;
  if (t == 0) { st.status[0] = 0; st.status[3] = 0; }
  __syncthreads();
  int64_t bad = 0;
  for (int64_t x = t; x < st.N; x += T) {
    const int64_t l = st.labels[x];
    if (label_ok(l, st.N)) atomicAdd(st.count + l, 1);
    else ++bad;
  }
  if (bad) atomicAdd(reinterpret_cast<unsigned long long*>(st.status), static_cast<unsigned long long>(bad));
}

// The block scratch of cluster_kernel lives in global memory (kScratch doubles per block, L1
// cached), not in __shared__ arrays: the emulation keeps every __shared__ array in its library's
// static TLS, which is nearly full.
constexpr int kScratch = 32 + 16 + kChunk / 2;  // block_sum's 32 doubles, block_prefix's 32 ints, the members

// Sum over the block (fixed tree: the same result on every run); every thread gets it.
__device__ __forceinline__ double block_sum(double a, double* sa) {
  const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
  for (int o = kWarp / 2; o > 0; o >>= 1) a += __shfl_down_sync(0xffffffffu, a, o);
  __syncthreads();  // sa may still be read by a previous call
  if (lane == 0) sa[wid] = a;
  __syncthreads();
  a = lane < nw ? sa[lane] : 0.0;
  for (int o = kWarp / 2; o > 0; o >>= 1) a += __shfl_down_sync(0xffffffffu, a, o);
  return __shfl_sync(0xffffffffu, a, 0);
}

// Exclusive prefix over the block of 0/1 flags, and the block's total (every thread).
__device__ __forceinline__ int block_prefix(int flag, int& total, int* warp_tot) {
  const int lane = threadIdx.x % kWarp, wid = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
  int inc = flag;
  for (int o = 1; o < kWarp; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += v;
  }
  __syncthreads();
  if (lane == kWarp - 1) warp_tot[wid] = inc;
  __syncthreads();
  int before = 0;
  total = 0;
  for (int w = 0; w < nw; ++w) {
    if (w < wid) before += warp_tot[w];
    total += warp_tot[w];
  }
  return before + inc - flag;
}

// torch.argmax's order: a NaN beats everything (the first NaN wins), else the larger value,
// ties to the lower index.
struct ArgmaxBetter {
  __device__ __forceinline__ bool operator()(double v, int64_t j, double bv, int64_t bj) const {
    if (isnan(v)) return !isnan(bv) || j < bj;
    if (isnan(bv)) return false;
    return v > bv || (v == bv && j < bj);
  }
};

__global__ void __launch_bounds__(kClusterThreads) cluster_kernel(AggState st) {
  double* scratch = st.scratch + static_cast<int64_t>(blockIdx.x) * kScratch;
  int* warp_tot = reinterpret_cast<int*>(scratch + 32);
  int32_t* members = reinterpret_cast<int32_t*>(scratch + 48);
  const int64_t l = blockIdx.x, t = threadIdx.x, T = blockDim.x, N = st.N, D = st.D, W = st.D + st.C;
  const int32_t n = st.count[l];  // uniform over the block
  if (n > 0) {
    double acc[kDimsPerThread];
#pragma unroll
    for (int p = 0; p < kDimsPerThread; ++p) acc[p] = 0.0;
    double sim_sum = 0.0, matches = 0.0;
    int32_t found = 0;
    for (int64_t c0 = 0; c0 < N && found < n; c0 += kChunk) {  // found, n: uniform
      const int64_t x = c0 + t;
      const int flag = (t < kChunk && x < N && st.labels[x] == l) ? 1 : 0;
      int total;
      const int pos = block_prefix(flag, total, warp_tot);
      if (flag) {
        members[pos] = static_cast<int32_t>(x);
        sim_sum += static_cast<double>(st.sim[x]);
        matches += st.cand[x] ? 1.0 : 0.0;
      }
      __syncthreads();
      for (int m = 0; m < total; ++m) {  // ascending patch order
        const int64_t y = members[m];
#pragma unroll
        for (int p = 0; p < kDimsPerThread; ++p) {
          const int64_t d = t + p * T;
          if (d < W) {
            acc[p] += static_cast<double>(d < D ? st.deb[y * D + d] : st.feat[y * st.fs0 + (d - D) * st.fs1]);
          }
        }
      }
      __syncthreads();  // members is rewritten by the next chunk
      found += total;
    }
    sim_sum = block_sum(sim_sum, scratch);
    matches = block_sum(matches, scratch);
    const double area = static_cast<double>(n);  // >= 1: clamp(min=1) is a no-op here
    // The float32 means, as the reference casts them, then their norms.
    float mean[kDimsPerThread];
    double sq_deb = 0.0, sq_feat = 0.0;
#pragma unroll
    for (int p = 0; p < kDimsPerThread; ++p) {
      const int64_t d = t + p * T;
      mean[p] = static_cast<float>(acc[p] / area);
      const double m2 = static_cast<double>(mean[p]) * static_cast<double>(mean[p]);
      if (d < D) sq_deb += m2;
      else if (d < W) sq_feat += m2;
    }
    sq_deb = block_sum(sq_deb, scratch);
    sq_feat = block_sum(sq_feat, scratch);
    const float nd = fmaxf(static_cast<float>(sqrt(sq_deb)), 1e-12f);  // F.normalize's eps
    const float nf = fmaxf(static_cast<float>(sqrt(sq_feat)), 1e-12f);
    double dot = 0.0;
#pragma unroll
    for (int p = 0; p < kDimsPerThread; ++p) {
      const int64_t d = t + p * T;
      if (d < D) dot += static_cast<double>(mean[p] / nd) * static_cast<double>(st.proto[d]);
      else if (d < W) st.protos[l * st.C + (d - D)] = mean[p] / nf;
    }
    dot = block_sum(dot, scratch);
    if (t == 0) {
      st.cross[l] = static_cast<float>(sim_sum / area);
      st.weight[l] = static_cast<float>(matches / area);
      st.cross_proto[l] = static_cast<float>(dot);
      st.n_match[l] = static_cast<int32_t>(matches);
    }
  } else if (t == 0) {
    st.n_match[l] = 0;
  }
  if (!last_block_done(reinterpret_cast<int32_t*>(st.status + 3))) return;
  // The seed over every label (empty or candidate-free ones are -inf), and any candidate: one
  // warp, shuffles only (the order is a total one, so the tree does not matter).
  if (t >= kWarp) return;
  const volatile float* cp = st.cross_proto;
  const volatile int32_t* nm = st.n_match;
  double bv = -INFINITY;
  int64_t bj = INT64_MAX;
  int any = 0;
  const ArgmaxBetter better;
  for (int64_t k = t; k < N; k += kWarp) {
    const double v = nm[k] > 0 ? static_cast<double>(cp[k]) : -INFINITY;
    if (better(v, k, bv, bj)) { bv = v; bj = k; }
    any |= nm[k] > 0 ? 1 : 0;
  }
  warp_best_by(bv, bj, better);
  for (int o = kWarp / 2; o > 0; o >>= 1) any |= __shfl_down_sync(0xffffffffu, any, o);
  if (t == 0) {
    st.status[1] = bj == INT64_MAX ? 0 : bj;
    st.status[2] = any;
  }
}

__global__ void __launch_bounds__(kMaskThreads) mask_kernel(AggState st, float threshold, bool* __restrict__ mask) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t x = warp < st.N ? warp : st.N - 1;  // whole warps run the shuffles
  const int64_t l = st.labels[x];
  const bool ok = label_ok(l, st.N);
  const int64_t seed = st.status[1];
  double dot = 0.0;
  // Without any candidate the seed is a stand-in (0) whose prototype may be unwritten, and the
  // mask is empty: no read (uniform over the grid, so every lane still runs the shuffles).
  if (ok && st.status[2] != 0) {
    const float* a = st.protos + l * st.C;
    const float* b = st.protos + seed * st.C;
    for (int64_t c = lane; c < st.C; c += kWarp) dot += static_cast<double>(a[c]) * static_cast<double>(b[c]);
  }
  for (int o = kWarp / 2; o > 0; o >>= 1) dot += __shfl_down_sync(0xffffffffu, dot, o);
  if (lane != 0 || warp >= st.N) return;
  if (!ok) { mask[x] = false; return; }
  const float intra = static_cast<float>(dot);
  const float w = l == seed ? 1.0f : st.weight[l];
  const float score = __fmul_rn(__fmul_rn(st.cross[l], intra), w);
  mask[x] = st.status[2] != 0 && score > threshold;
}

at::Tensor aggregate_clusters_cuda(const at::Tensor& labels, const at::Tensor& candidates, const at::Tensor& feats_deb,
                                   const at::Tensor& feats, const at::Tensor& sim, const at::Tensor& prototype,
                                   double merge_threshold) {
  constexpr const char* op = "aggregate_clusters";
  check_cuda_tensor(labels, op, "labels", at::kLong, 1);
  check_cuda_tensor(candidates, op, "candidates", at::kBool, 1);
  check_cuda_tensor(feats_deb, op, "feats_deb", at::kFloat, 2);
  check_cuda_tensor(feats, op, "feats", at::kFloat, 2);
  check_cuda_tensor(sim, op, "sim", at::kFloat, 1);
  check_cuda_tensor(prototype, op, "prototype", at::kFloat, 1);
  check_same_device(op, {{"labels", &labels}, {"candidates", &candidates}, {"feats_deb", &feats_deb},
                         {"feats", &feats}, {"sim", &sim}, {"prototype", &prototype}});
  const int64_t N = labels.size(0), D = feats_deb.size(1), C = feats.size(1);
  TORCH_CHECK(candidates.size(0) == N && feats_deb.size(0) == N && feats.size(0) == N && sim.size(0) == N, op,
              ": labels, candidates, feats_deb, feats and sim must have the same length N = ", N);
  TORCH_CHECK(prototype.size(0) == D, op, ": prototype must be (D,) with D = ", D, ", got ", prototype.sizes());
  TORCH_CHECK(N < (int64_t(1) << 31), op, ": N must be < 2^31");
  TORCH_CHECK(D + C <= int64_t(kClusterThreads) * kDimsPerThread, op, ": D + C must be at most ",
              kClusterThreads * kDimsPerThread, ", got ", D + C);
  insid3::checked_mul(N, C, op, "the prototypes N * C");
  c10::cuda::CUDAGuard guard(labels.device());
  auto mask = at::empty({N}, labels.options().dtype(at::kBool));
  if (N == 0) return mask;
  const auto lab = labels.contiguous(), cand = candidates.contiguous(), deb = feats_deb.contiguous();
  const auto s = sim.contiguous(), p = prototype.contiguous();
  const auto& f = feats;  // any strides: the kernel reads feats[y][c] at y * fs0 + c * fs1
  auto opts = labels.options();
  auto ints = at::empty({2, N}, opts.dtype(at::kInt));     // count, n_match
  auto floats = at::empty({3, N}, opts.dtype(at::kFloat));  // cross, weight, cross_proto
  auto protos = at::empty({N, C}, opts.dtype(at::kFloat));
  auto status = at::empty({4}, opts);
  auto scratch = at::empty({N, kScratch}, opts.dtype(at::kDouble));
  AggState st{lab.data_ptr<int64_t>(), cand.data_ptr<bool>(), deb.data_ptr<float>(), f.data_ptr<float>(),
              s.data_ptr<float>(), p.data_ptr<float>(), N, D, C, f.stride(0), f.stride(1),
              ints.data_ptr<int32_t>(), protos.data_ptr<float>(), floats.data_ptr<float>(),
              floats.data_ptr<float>() + N, floats.data_ptr<float>() + 2 * N, ints.data_ptr<int32_t>() + N,
              status.data_ptr<int64_t>(), scratch.data_ptr<double>()};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  INSID3_LAUNCH(sizes_kernel, 1, kSizeThreads, 0, stream)(st);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!capturing()) {  // the one host read: out-of-range labels would belong to no cluster
    const int64_t bad = status[0].item<int64_t>();
    TORCH_CHECK(bad == 0, op, ": labels must lie in [0, N) with N = ", N, "; ", bad, " do not");
  }
  INSID3_LAUNCH(cluster_kernel, static_cast<unsigned int>(N), kClusterThreads, 0, stream)(st);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t warps_per_block = kMaskThreads / kWarp;
  INSID3_LAUNCH(mask_kernel, grid_1d(ceil_div(N, warps_per_block) * kMaskThreads, kMaskThreads), kMaskThreads, 0,
                stream)(st, static_cast<float>(merge_threshold), mask.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

}  // namespace
}  // namespace insid3_cuda

INSID3_CUDA_LIBRARY_IMPL(m) {
  m.impl("aggregate_clusters", &insid3_cuda::aggregate_clusters_cuda);
}
