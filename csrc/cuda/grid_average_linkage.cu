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
// One round on the device, three launches (G1; G2 + G3; G4 + G5: the single-block steps run in
// the block that finishes last, see last_block_done; all launch sizes depend on shapes only):
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
// Termination: the scheme of average_linkage.cu, without host synchronisation: a chunk of
// kFirstChunkRounds multi-block rounds, then grid_tail_kernel (one block, the same steps)
// finishes the clustering if the chunk did not.
#include <climits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include "common/grid_rounds.h"
#include "cuda/cuda_utils.cuh"

namespace insid3_cuda {
namespace {

constexpr int kEdgeThreads = 128;
constexpr int kPointThreads = 256;
constexpr int kSumThreads = 128;
constexpr int kFirstChunkRounds = 12;
constexpr int kTailThreads = 1024;
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

// Edge e = p * K + dir of the grid (insid3::grid_edge: each neighbour pair once, the CPU's order).
__device__ __forceinline__ bool edge_endpoints(const GridState& st, int64_t e, int64_t& p, int64_t& q) {
  p = e / st.K;
  return insid3::grid_edge(p, static_cast<int>(e % st.K), st.h, st.w, &q);
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

// ---- the steps of one round, shared by the multi-block kernels and the tail ----------------

// G1 for edge e.
__device__ __forceinline__ void edge_linkage_one(const GridState& st, int64_t e, int32_t round) {
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

// G2 for edge e (after every G1).
__device__ __forceinline__ void edge_ties_one(const GridState& st, int64_t e) {
  int64_t p, q;
  if (!edge_endpoints(st, e, p, q)) return;
  const int32_t a = st.rep[p], b = st.rep[q];
  if (a == b) return;
  const unsigned long long key = order_key(st.edge_d[e]);
  if (key == st.best_key[a]) atomicMin(st.best_id + a, b);
  if (key == st.best_key[b]) atomicMin(st.best_id + b, a);
}

// G3 for cluster id c: the lower id of a reciprocal pair below the threshold takes a slot.
// best_id / best_key are read through volatile pointers: in the multi-block round the atomics of
// other blocks wrote them in this launch.
__device__ __forceinline__ void decide_one(const GridState& st, int64_t c, int32_t* count, int32_t round,
                                           double threshold) {
  if (st.rep[c] != c) return;  // not a live cluster id
  const volatile int32_t* best_id = st.best_id;
  const volatile unsigned long long* best_key = st.best_key;
  const int32_t nb = best_id[c];
  const unsigned long long key = best_key[c];
  if (nb == INT_MAX || key == kNoKey) return;  // no adjacent cluster
  if (!insid3::round_merges(c, nb, best_id[nb], key_value(key), threshold)) return;
  const int32_t slot = atomicAdd(count, 1);
  st.pairs[slot] = static_cast<int32_t>(c);
  st.absorbed_by[nb] = static_cast<int32_t>(c);
  st.absorbed_round[nb] = round;
  st.merged_round[c] = round;
}

// G4 for pair slot s, coordinates k0, k0 + dk, ...: s_a <- s_a + s_b (a < b = best_id[a], reset
// only in G5); the thread with k0 == 0 adds the sizes.
__device__ __forceinline__ void merge_sums_one(const GridState& st, int64_t s, int64_t k0, int64_t dk) {
  const int64_t a = st.pairs[s];
  const int64_t b = st.best_id[a];
  for (int64_t k = k0; k < st.C; k += dk) st.sumT[k * st.N + a] += st.sumT[k * st.N + b];
  if (k0 == 0) st.cnt[a] = st.cnt[a] + st.cnt[b];
}

// G5 for patch p: members of absorbed clusters take the survivor's id (one step: rep stays
// flat), and the per-cluster minima are reset for the next round.
__device__ __forceinline__ void relabel_one(const GridState& st, int64_t p, int32_t round) {
  const int32_t a = st.rep[p];
  if (st.absorbed_round[a] == round) st.rep[p] = st.absorbed_by[a];
  st.best_key[p] = kNoKey;
  st.best_id[p] = INT_MAX;
}

// ---- multi-block rounds: three launches each --------------------------------------------------

__global__ void __launch_bounds__(kEdgeThreads)
edge_linkage_kernel(GridState st, const int32_t* __restrict__ prev_count, int32_t round) {
  if (*prev_count == 0) return;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < st.N * st.K) edge_linkage_one(st, e, round);
}

// G2, then G3 in the block that finishes last. G3 reads the minima the other blocks' atomics
// wrote in this launch through volatile pointers (no stale L1 line may answer).
__global__ void __launch_bounds__(kEdgeThreads)
edge_ties_decide_kernel(GridState st, const int32_t* __restrict__ prev_count, int32_t* cur_count, int32_t* done,
                        int32_t round, double threshold) {
  if (*prev_count == 0) return;  // uniform over the grid
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < st.N * st.K) edge_ties_one(st, e);
  if (!last_block_done(done)) return;
  for (int64_t c = threadIdx.x; c < st.N; c += blockDim.x) decide_one(st, c, cur_count, round, threshold);
}

// G4 (each block takes slots s = blockIdx.x, + gridDim.x, ...), then G5 in the block that
// finishes last.
__global__ void __launch_bounds__(kSumThreads)
merge_relabel_kernel(GridState st, const int32_t* __restrict__ cur_count, int32_t* done, int32_t round) {
  const int32_t count = *cur_count;
  if (count == 0) return;  // uniform: no merge this round, nothing to relabel, no next round
  for (int64_t s = blockIdx.x; s < count; s += gridDim.x) merge_sums_one(st, s, threadIdx.x, blockDim.x);
  if (!last_block_done(done)) return;
  for (int64_t p = threadIdx.x; p < st.N; p += blockDim.x) relabel_one(st, p, round);
}

// ---- the tail: the remaining rounds in one block -------------------------------------------

// Runs rounds first_round, first_round + 1, ... until one merges nothing, if the chunk's last
// round (*last_count) still merged. counter: one device int of scratch.
__global__ void __launch_bounds__(kTailThreads)
grid_tail_kernel(GridState st, const int32_t* __restrict__ last_count, int32_t* counter, int32_t first_round,
                 double threshold) {
  if (*last_count == 0) return;  // uniform: the chunk converged
  const int64_t t = threadIdx.x, T = blockDim.x, E = st.N * st.K;
  for (int32_t round = first_round;; ++round) {
    if (t == 0) *counter = 0;
    for (int64_t e = t; e < E; e += T) edge_linkage_one(st, e, round);
    __syncthreads();
    for (int64_t e = t; e < E; e += T) edge_ties_one(st, e);
    __syncthreads();
    for (int64_t c = t; c < st.N; c += T) decide_one(st, c, counter, round, threshold);
    __syncthreads();
    const int32_t count = *counter;  // every thread reads it before thread 0 resets it
    if (count == 0) return;          // uniform
    for (int64_t s = 0; s < count; ++s) merge_sums_one(st, s, t, T);
    __syncthreads();
    for (int64_t p = t; p < st.N; p += T) relabel_one(st, p, round);
    __syncthreads();
  }
}

// Every patch its own cluster (size 1, never merged, no minimum yet), and the round counters.
__global__ void init_state_kernel(GridState st, int32_t* counts, int64_t slots) {
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x < slots) round_counts_init(counts, x);
  if (x >= st.N) return;
  st.cnt[x] = 1.0;
  st.rep[x] = static_cast<int32_t>(x);
  st.merged_round[x] = -1;
  st.absorbed_round[x] = -1;
  st.absorbed_by[x] = -1;
  st.best_key[x] = kNoKey;
  st.best_id[x] = INT_MAX;
}

void enqueue_rounds(const GridState& st, int32_t* counts, int rounds, double threshold, cudaStream_t stream) {
  const int64_t E = st.N * st.K;
  const unsigned int pair_blocks = static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(st.N / 2, kMaxPairBlocks)));
  int32_t* done = counts + rounds + 2;
  for (int32_t round = 0; round < rounds; ++round) {
    const int32_t* prev = counts + round;
    int32_t* cur = counts + round + 1;
    INSID3_LAUNCH(edge_linkage_kernel, grid_1d(E, kEdgeThreads), kEdgeThreads, 0, stream)(st, prev, round);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    INSID3_LAUNCH(edge_ties_decide_kernel, grid_1d(E, kEdgeThreads), kEdgeThreads, 0, stream)(st, prev, cur, done,
                                                                                            round, threshold);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    INSID3_LAUNCH(merge_relabel_kernel, pair_blocks, kSumThreads, 0, stream)(st, cur, done, round);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor grid_average_linkage_cuda(const at::Tensor& features, int64_t h, int64_t w, int64_t connectivity,
                                     double threshold) {
  constexpr const char* op = "grid_average_linkage";
  check_cuda_tensor(features, op, "features", at::kFloat, 2);
  TORCH_CHECK(h >= 0 && w >= 0, op, ": h and w must be >= 0, got h=", h, " w=", w);
  const int64_t N = insid3::checked_mul(h, w, op, "the grid size h * w");
  TORCH_CHECK(features.size(0) == N, op, ": features must be (h*w, C) = (", N, ", C), got ", features.sizes());
  TORCH_CHECK(connectivity == 4 || connectivity == 8, op, ": connectivity must be 4 or 8, got ", connectivity);
  TORCH_CHECK(N < (int64_t(1) << 30), op, ": h*w must be < 2^30, got ", N);
  insid3::check_threshold(threshold, op);
  const int64_t C = features.size(1);
  insid3::checked_mul(N, C, op, "the number of feature values h * w * C");
  c10::cuda::CUDAGuard guard(features.device());  // before the check: its kernel runs on this device
  check_finite(features, op, "features");
  auto opts = features.options();
  if (N == 0) return at::empty({0}, opts.dtype(at::kLong));
  const int K = insid3::grid_edges_per_patch(static_cast<int>(connectivity));

  auto sumT = features.contiguous().to(at::kDouble).t().contiguous();  // (C, N)
  // Uninitialised buffers, set by one kernel (init_state_kernel) instead of one fill each.
  auto cnt = at::empty({N}, opts.dtype(at::kDouble));
  auto edge_d = at::empty({N * K}, opts.dtype(at::kDouble));
  auto ints = at::empty({6, N}, opts.dtype(at::kInt));  // rep, merged/absorbed round, absorbed_by, best_id, pairs
  auto best_key = at::empty({N}, opts.dtype(at::kLong));
  auto rep = ints.select(0, 0);
  int32_t* ip = ints.data_ptr<int32_t>();

  GridState st{N, C, h, w, K,
               sumT.data_ptr<double>(), cnt.data_ptr<double>(), ip,
               edge_d.data_ptr<double>(), ip + N, ip + 2 * N, ip + 3 * N,
               reinterpret_cast<unsigned long long*>(best_key.data_ptr<int64_t>()), ip + 4 * N, ip + 5 * N};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int rounds = static_cast<int>(INSID3_TUNABLE("grid_average_linkage.first_chunk_rounds", kFirstChunkRounds));
  auto counts = at::empty({round_count_slots(rounds)}, opts.dtype(at::kInt));
  int32_t* c = counts.data_ptr<int32_t>();
  INSID3_LAUNCH(init_state_kernel, grid_1d(std::max<int64_t>(N, round_count_slots(rounds)), kPointThreads),
                kPointThreads, 0, stream)(st, c, round_count_slots(rounds));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  enqueue_rounds(st, c, rounds, threshold, stream);
  INSID3_LAUNCH(grid_tail_kernel, 1, kTailThreads, 0, stream)(st, c + rounds, c + rounds + 1, rounds, threshold);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return labels_from_parent(rep);  // rep is flat and rep[id] == id for live ids: a valid forest
}

}  // namespace
}  // namespace insid3_cuda

INSID3_CUDA_LIBRARY_IMPL(m) {
  m.impl("grid_average_linkage", &insid3_cuda::grid_average_linkage_cuda);
}
