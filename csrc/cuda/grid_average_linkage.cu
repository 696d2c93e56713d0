// CUDA kernel of insid3_fast::grid_average_linkage: connectivity-constrained average linkage
// on an h x w grid (4- or 8-neighbourhood), reciprocal-nearest-neighbour rounds.
//
// Semantics (identical to csrc/cpu): a cluster is a sum vector (double) and a size, its id is
// its smallest patch index. Two clusters are adjacent when some member of one is a grid
// neighbour of some member of the other. Linkage = insid3::sum_linkage(s_a, s_b, C, n_a, n_b)
// (sequential fma, the same value bit for bit). Every round, each cluster picks its nearest
// adjacent cluster with insid3::better_min (smallest linkage, ties to the smallest id); every
// reciprocal pair with linkage < threshold merges into the smaller id (sum = s_small + s_large).
// Rounds repeat until one makes no merge.
//
// One round on the device (all launch sizes depend on shapes only):
//   G1 edges  : every grid edge (p, q) with rep[p] != rep[q] gives the adjacent pair (a, b);
//               its linkage is recomputed only if a or b changed in the previous round (else the
//               cached edge value is still exact), then atomicMin of an order-preserving 64-bit
//               key of the linkage into best_key[a] and best_key[b].
//   G2 ties   : edges whose linkage key equals best_key[a] (resp. [b]) atomicMin the other id
//               into best_id[a] (resp. [b]): smallest linkage, ties to the smallest id — the
//               better_min rule, independent of the order of the atomics.
//   G3 decide : a < b = best_id[a], best_id[b] == a, linkage < threshold -> pair (a absorbs b).
//   G4 sums   : s_a += s_b, n_a += n_b.
//   G5 relabel: rep[p] <- a for members of absorbed clusters (rep stays flat: rep[p] is always
//               the cluster id), and reset best_key / best_id for the next round.
// Sums are stored transposed, (C, N), so that a warp's threads, which handle neighbouring
// edges, read neighbouring addresses at each step of the sequential dot product.
// Termination: the fixed-chunk + device-count scheme of average_linkage.cu (a chunk of
// kFirstChunkRounds rounds, then one 4-byte read to check; skipped under graph capture).
#include <climits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include "cuda/cuda_utils.cuh"

namespace insid3_cuda {
namespace {

constexpr int kEdgeThreads = 128;
constexpr int kPointThreads = 256;
constexpr int kSumThreads = 128;
constexpr int kFirstChunkRounds = 96;
constexpr int kMoreChunkRounds = 32;
constexpr int kMaxPairBlocks = 4096;
constexpr unsigned long long kNoKey = ~0ull;

struct GridState {
  int64_t N, C;
  int64_t h, w;
  int K;                        // edges per patch: 2 (4-connectivity) or 4 (8-connectivity)
  double* sumT;                 // (C, N): sumT[k * N + id] = k-th coordinate of cluster id's sum
  double* cnt;                  // (N,) sizes, valid for live ids
  int32_t* rep;                 // (N,) cluster id of each patch
  double* edge_d;               // (N * K,) cached linkage of each edge's cluster pair
  int32_t* merged_round;        // round in which the id last absorbed a cluster (-1: never)
  int32_t* absorbed_round;      // round in which the id was absorbed (-1: never)
  int32_t* absorbed_by;         // the id that absorbed it
  unsigned long long* best_key; // (N,) order key of the nearest adjacent linkage
  int32_t* best_id;             // (N,) its id (INT_MAX: no adjacent cluster)
  int32_t* pairs;               // survivors of this round
};

// Edge directions: right, down (4-connectivity), then down-right, down-left (8-connectivity).
// Each unordered neighbour pair is enumerated exactly once.
__device__ __forceinline__ bool edge_endpoints(const GridState& st, int64_t e, int64_t& p, int64_t& q) {
  p = e / st.K;
  const int dir = static_cast<int>(e % st.K);
  const int64_t y = p / st.w, x = p % st.w;
  const int dy = (dir == 0) ? 0 : 1;
  const int dx = (dir == 0 || dir == 2) ? 1 : (dir == 1 ? 0 : -1);
  const int64_t ny = y + dy, nx = x + dx;
  if (ny >= st.h || nx < 0 || nx >= st.w) return false;
  q = ny * st.w + nx;
  return true;
}

// Order-preserving map double -> uint64 (a < b  <=>  key(a) < key(b)); -0.0 and +0.0 share a
// key (better_min treats them as equal) and every NaN gets the largest key (never better).
__device__ __forceinline__ unsigned long long order_key(double d) {
  if (d != d) return kNoKey;
  if (d == 0.0) d = 0.0;
  const unsigned long long b = static_cast<unsigned long long>(__double_as_longlong(d));
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}

__device__ __forceinline__ double key_value(unsigned long long k) {
  const unsigned long long b = (k & 0x8000000000000000ull) ? (k & 0x7fffffffffffffffull) : ~k;
  return __longlong_as_double(static_cast<long long>(b));
}

// insid3::sum_linkage on the transposed layout: the same operations in the same order.
__device__ __forceinline__ double sum_linkage_strided(const double* sa, const double* sb, int64_t C,
                                                      int64_t stride, double na, double nb) {
  double acc = 0.0;
  for (int64_t k = 0; k < C; ++k) acc = fma(sa[k * stride], sb[k * stride], acc);
  return 1.0 - acc / (na * nb);
}

__global__ void __launch_bounds__(kEdgeThreads)
edge_linkage_kernel(GridState st, const int32_t* __restrict__ prev_count, int32_t round) {
  if (*prev_count == 0) return;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= st.N * st.K) return;
  int64_t p, q;
  if (!edge_endpoints(st, e, p, q)) return;
  const int32_t a = st.rep[p], b = st.rep[q];
  if (a == b) return;
  double d;
  if (st.merged_round[a] == round - 1 || st.merged_round[b] == round - 1) {
    // One of the clusters changed (round 0: every cluster is new): recompute.
    d = sum_linkage_strided(st.sumT + a, st.sumT + b, st.C, st.N, st.cnt[a], st.cnt[b]);
    st.edge_d[e] = d;
  } else {
    d = st.edge_d[e];  // same pair (a, b), same sums and sizes as when it was computed
  }
  const unsigned long long key = order_key(d);
  atomicMin(st.best_key + a, key);
  atomicMin(st.best_key + b, key);
}

__global__ void __launch_bounds__(kEdgeThreads)
edge_ties_kernel(GridState st, const int32_t* __restrict__ prev_count) {
  if (*prev_count == 0) return;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= st.N * st.K) return;
  int64_t p, q;
  if (!edge_endpoints(st, e, p, q)) return;
  const int32_t a = st.rep[p], b = st.rep[q];
  if (a == b) return;
  const unsigned long long key = order_key(st.edge_d[e]);
  if (key == st.best_key[a]) atomicMin(st.best_id + a, b);
  if (key == st.best_key[b]) atomicMin(st.best_id + b, a);
}

__global__ void decide_kernel(GridState st, const int32_t* __restrict__ prev_count, int32_t* cur_count,
                              int32_t round, double threshold) {
  if (*prev_count == 0) return;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= st.N || st.rep[c] != c) return;  // not a live cluster id
  const int32_t nb = st.best_id[c];
  if (nb == INT_MAX || nb <= c || st.best_id[nb] != c) return;  // the lower id of a reciprocal pair acts
  const unsigned long long key = st.best_key[c];
  if (key == kNoKey || !(key_value(key) < threshold)) return;   // merge iff linkage < threshold
  const int32_t slot = atomicAdd(cur_count, 1);
  st.pairs[slot] = static_cast<int32_t>(c);
  st.absorbed_by[nb] = static_cast<int32_t>(c);
  st.absorbed_round[nb] = round;
  st.merged_round[c] = round;
}

// s_a <- s_a + s_b (a < b) for every pair; b = best_id[a] (reset only in G5).
__global__ void __launch_bounds__(kSumThreads)
merge_sums_kernel(GridState st, const int32_t* __restrict__ cur_count) {
  const int32_t count = *cur_count;
  for (int64_t s = blockIdx.x; s < count; s += gridDim.x) {
    const int64_t a = st.pairs[s];
    const int64_t b = st.best_id[a];
    for (int64_t k = threadIdx.x; k < st.C; k += blockDim.x) st.sumT[k * st.N + a] += st.sumT[k * st.N + b];
    if (threadIdx.x == 0) st.cnt[a] = st.cnt[a] + st.cnt[b];
  }
}

__global__ void relabel_kernel(GridState st, const int32_t* __restrict__ cur_count, int32_t round) {
  if (*cur_count == 0) return;  // no merge this round: nothing to relabel, no next round
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= st.N) return;
  const int32_t a = st.rep[p];
  if (st.absorbed_round[a] == round) st.rep[p] = st.absorbed_by[a];  // a survivor: one step suffices
  st.best_key[p] = kNoKey;
  st.best_id[p] = INT_MAX;
}

void enqueue_rounds(const GridState& st, int32_t* counts, int first_round, int rounds, double threshold,
                    cudaStream_t stream) {
  const int64_t E = st.N * st.K;
  const unsigned int pair_blocks = static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(st.N / 2, kMaxPairBlocks)));
  for (int r = 0; r < rounds; ++r) {
    const int32_t round = first_round + r;
    const int32_t* prev = counts + r;
    int32_t* cur = counts + r + 1;
    edge_linkage_kernel<<<grid_1d(E, kEdgeThreads), kEdgeThreads, 0, stream>>>(st, prev, round);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    edge_ties_kernel<<<grid_1d(E, kEdgeThreads), kEdgeThreads, 0, stream>>>(st, prev);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    decide_kernel<<<grid_1d(st.N, kPointThreads), kPointThreads, 0, stream>>>(st, prev, cur, round, threshold);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    merge_sums_kernel<<<pair_blocks, kSumThreads, 0, stream>>>(st, cur);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    relabel_kernel<<<grid_1d(st.N, kPointThreads), kPointThreads, 0, stream>>>(st, cur, round);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor grid_average_linkage_cuda(const at::Tensor& features, int64_t h, int64_t w, int64_t connectivity,
                                     double threshold) {
  constexpr const char* op = "insid3_fast::grid_average_linkage (CUDA)";
  check_cuda_tensor(features, op, "features", at::kFloat, 2);
  TORCH_CHECK(h >= 0 && w >= 0, op, ": h and w must be >= 0, got h=", h, " w=", w);
  TORCH_CHECK(features.size(0) == h * w, op, ": features must be (h*w, C) = (", h * w, ", C), got ",
              features.sizes());
  TORCH_CHECK(connectivity == 4 || connectivity == 8, op, ": connectivity must be 4 or 8, got ", connectivity);
  const int64_t N = h * w, C = features.size(1);
  TORCH_CHECK(N < (int64_t(1) << 30), op, ": h*w must be < 2^30, got ", N);
  c10::cuda::CUDAGuard guard(features.device());
  auto opts = features.options();
  if (N == 0) return at::empty({0}, opts.dtype(at::kLong));
  const int K = connectivity == 4 ? 2 : 4;

  auto sumT = features.contiguous().to(at::kDouble).t().contiguous();  // (C, N)
  auto cnt = at::ones({N}, opts.dtype(at::kDouble));
  auto rep = at::arange(N, opts.dtype(at::kInt));
  auto edge_d = at::empty({N * K}, opts.dtype(at::kDouble));
  auto merged_round = at::full({N}, -1, opts.dtype(at::kInt));
  auto absorbed_round = at::full({N}, -1, opts.dtype(at::kInt));
  auto absorbed_by = at::full({N}, -1, opts.dtype(at::kInt));
  auto best_key = at::full({N}, -1, opts.dtype(at::kLong));  // all bits set = kNoKey
  auto best_id = at::full({N}, INT_MAX, opts.dtype(at::kInt));
  auto pairs = at::empty({std::max<int64_t>(1, N / 2)}, opts.dtype(at::kInt));

  GridState st{N, C, h, w, K,
               sumT.data_ptr<double>(), cnt.data_ptr<double>(), rep.data_ptr<int32_t>(),
               edge_d.data_ptr<double>(), merged_round.data_ptr<int32_t>(), absorbed_round.data_ptr<int32_t>(),
               absorbed_by.data_ptr<int32_t>(),
               reinterpret_cast<unsigned long long*>(best_key.data_ptr<int64_t>()), best_id.data_ptr<int32_t>(),
               pairs.data_ptr<int32_t>()};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  auto counts = at::zeros({kFirstChunkRounds + 1}, opts.dtype(at::kInt));
  counts.narrow(0, 0, 1).fill_(1);
  enqueue_rounds(st, counts.data_ptr<int32_t>(), 0, kFirstChunkRounds, threshold, stream);
  int done_rounds = kFirstChunkRounds, last = kFirstChunkRounds;
  // Completion check: one 4-byte read (a sync), skipped under CUDA graph capture.
  if (!c10::cuda::isStreamCapturingMayInitCtx(stream)) {
    while (counts[last].item<int32_t>() != 0) {
      auto more = at::zeros({kMoreChunkRounds + 1}, opts.dtype(at::kInt));
      more.narrow(0, 0, 1).fill_(1);
      enqueue_rounds(st, more.data_ptr<int32_t>(), done_rounds, kMoreChunkRounds, threshold, stream);
      counts = more;
      last = kMoreChunkRounds;
      done_rounds += kMoreChunkRounds;
    }
  }
  return labels_from_parent(rep);  // rep is flat and rep[id] == id for live ids: a valid forest
}

}  // namespace
}  // namespace insid3_cuda

TORCH_LIBRARY_IMPL(insid3_fast, CUDA, m) {
  m.impl("grid_average_linkage", &insid3_cuda::grid_average_linkage_cuda);
}
