// CUDA kernels of insid3_fast::average_linkage_precomputed and insid3_fast::average_linkage:
// exact average linkage cut at a distance threshold (every merge with linkage < threshold).
//
// Algorithm: reciprocal-nearest-neighbour (RNN) rounds on a dense N x N double matrix. Average
// linkage is reducible, so merging every reciprocal pair below the threshold per round gives
// the partition of the one-pair-at-a-time algorithm (scipy / scikit-learn), ties broken by
// insid3::better_min (smallest distance, then lowest index). One round, two launches:
//   K1 search     : nn[i] = argmin_{active j != i} D[i][j] (one block per row); only rows that
//                   merged, or whose neighbour merged, in the previous round scan the whole row,
//                   the others compare their neighbour with last round's survivors (exact).
//   K2 decide     : i < j = nn[i], nn[j] == i, D[i][j] < threshold -> pair (i absorbs j); run by
//                   the block of K1 that finishes last (last_block_done).
//   K3 row        : row i of each pair P = (i, k): D[i][x] = avg_P(D[i][x], D[k][x]) for the
//                   unmerged and absorbed x, mirrored into D[x][i] for the unmerged x.
//   K4 between    : for two pairs P = (i, k), Q = (x, l) merged in the same round with i < x, the
//                   block of P writes D[i][x] = D[x][i] = avg_Q(avg_P(D[i][x], D[k][x]),
//                   avg_P(D[i][l], D[k][l])) (inner average over the lower-representative pair,
//                   outer over the other); K3 and K4 share a launch (a block barrier between).
//   K5 finalize   : sizes, deactivate absorbed clusters, parent links; run by the last block.
// avg_P(a, b) = (n_i a + n_k b) / (n_i + n_k) is insid3::average_update (scipy's formula),
// evaluated without fma contraction (average_update_rn) so it equals the CPU value.
// The matrix is symmetric from the start (built from the upper triangle of `dist`, as
// scikit-learn's precomputed path does) and stays symmetric, which also guarantees that each
// round with a mergeable pair merges at least the globally closest one.
//
// Termination without host synchronisation: the host enqueues a fixed chunk of multi-block
// rounds (kFirstChunkRounds = 12: a synthetic 1024 px target, N = 4096, merges 1036, 650, 478,
// 333, 235, 154, 120, 93, 54, 41, 34, 24 pairs in its first 12 rounds and about 40 in the 8
// after them, which the tail's incremental search makes cheap); every kernel of round r first reads count[r] (merges made in round
// r-1; count[0] = 1) and exits at once when it is 0. Then one single-block kernel
// (dense_tail_kernel) finishes the clustering if the chunk did not: it runs the same round
// steps (the __device__ functions below) in a loop until a round merges nothing. So the result is always the converged partition, on any stream, captured into
// a CUDA graph or not, and the host never reads a device value to get it.
//
// Memory: the (N, N) double matrix D plus O(N) state, nothing N x N beside it. The float32
// Gram matrix is computed in row blocks of kGramRows rows (the CPU kernel's blocks, so the same
// float32 values) straight into D's own storage: the block of rows [i0, i0 + B) against rows
// [i0, N) goes into the first half of those rows of D, read as 2N floats (row i's float j at
// byte 8 N i + 4 j). One kernel then widens each row in place to 1 - clamp(g) in float64 over
// the upper triangle (widen_gram_kernel), and the state-initialising kernel mirrors it into the
// lower one: ceil(N / kGramRows) GEMMs and two kernels, peak 8 N^2 bytes (plus X).
//
// Input rule (common/input_rules.h, the CPU kernels'): the threshold is not NaN; dist finite
// (both triangles, as scikit-learn checks); features finite with C * max|x|^2 < 2^100, so every
// distance is finite. One host read checks it (none under graph capture, see cuda_utils.cuh).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include "cuda/bf16x6.cuh"
#include "cuda/cuda_utils.cuh"

namespace insid3_cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kPointThreads = 256;
constexpr int kTailThreads = 1024;
constexpr int kFirstChunkRounds = 12;
constexpr int kMaxPairBlocks = 2048;
constexpr int64_t kGramRows = 512;

struct DenseState {
  double* D;          // (N, N) symmetric, row-major
  int64_t N;
  double* size;       // cluster sizes (valid for active representatives)
  uint8_t* active;    // 1 while the index represents a live cluster
  int32_t* nn;        // nearest active neighbour (-1: none)
  double* nnd;        // its distance
  int32_t* mate;      // during a round: survivor -> absorbed partner (> i), absorbed -> survivor (< k); else -1
  int32_t* parent;    // merge forest: parent[k] = i when i absorbed k
  int32_t* pairs;     // survivors of this round, in slot order (order irrelevant: updates are independent)
  int32_t* touched;   // the last round in which the index merged (survivor or absorbed); -1: never
};

// ---- the steps of one round, shared by the multi-block kernels and the tail ----------------

// K1 for row i, the candidates j = j0, j0 + dj, ...: the best (distance, index) this thread
// sees, to be reduced over the threads that share the row. A row needs a full rescan only when
// i or its nearest neighbour merged in the previous round (or in round 0): otherwise the only
// entries of row i that changed are the columns of last round's survivors (absorbed columns
// died), so the best of the old neighbour and those survivors is the exact argmin (better_min
// is a total order) — with no appeal to reducibility, which rounding could break.
__device__ __forceinline__ void search_part(const DenseState& st, int64_t i, int round, int32_t prev_count,
                                            int64_t j0, int64_t dj, double& bv, int64_t& bj) {
  const int64_t N = st.N;
  const double* Di = st.D + i * N;
  const int32_t old = st.nn[i];
  const bool full = round == 0 || old < 0 || st.touched[i] == round - 1 || st.touched[old] == round - 1;
  if (full) {
    for (int64_t j = j0; j < N; j += dj) {
      if (j != i && st.active[j] && insid3::better_min(Di[j], j, bv, bj)) { bv = Di[j]; bj = j; }
    }
    return;
  }
  if (j0 == 0 && insid3::better_min(st.nnd[i], old, bv, bj)) { bv = st.nnd[i]; bj = old; }
  for (int64_t b = j0; b < prev_count; b += dj) {
    const int64_t c = st.pairs[b];  // a survivor of the previous round: active, != i
    if (insid3::better_min(Di[c], c, bv, bj)) { bv = Di[c]; bj = c; }
  }
}

// K2: the lower index of a reciprocal pair below the threshold takes a slot. nn / nnd are read
// through volatile pointers: in the multi-block round other blocks wrote them in this launch,
// and a cached line of this SM's L1 must not answer.
__device__ __forceinline__ void decide_one(const DenseState& st, int64_t i, int32_t* count, double threshold,
                                           int round) {
  if (!st.active[i]) return;
  const volatile int32_t* nn = st.nn;
  const volatile double* nnd = st.nnd;
  const int32_t j = nn[i];
  if (j <= i || nn[j] != i) return;  // j == -1 fails j <= i; only the lower index acts
  if (!(nnd[i] < threshold)) return;  // merge iff linkage < threshold (NaN never merges)
  const int32_t slot = atomicAdd(count, 1);
  st.pairs[slot] = static_cast<int32_t>(i);
  st.mate[i] = j;
  st.mate[j] = static_cast<int32_t>(i);
  st.touched[i] = round;
  st.touched[j] = round;
}

// K3 for pair P = (i, k) (slot b), columns x0, x0 + dx, ...: row i <- avg_P(row i, row k) for
// every active column except the survivors of other pairs, mirrored into column i for the
// unmerged columns. Each pair writes only its own row and, at column i, rows no pair reads.
__device__ __forceinline__ void row_update(const DenseState& st, int64_t b, int64_t x0, int64_t dx) {
  const int64_t N = st.N;
  const int64_t i = st.pairs[b];
  const int64_t k = st.mate[i];
  const double ni = st.size[i], nk = st.size[k];
  double* Di = st.D + i * N;
  const double* Dk = st.D + k * N;
  for (int64_t x = x0; x < N; x += dx) {
    if (x == i || x == k || !st.active[x]) continue;
    const int64_t mx = st.mate[x];
    if (mx >= 0 && mx > x) continue;  // x survives its own pair: K4
    const double v = average_update_rn(Di[x], Dk[x], ni, nk);
    Di[x] = v;
    if (mx < 0) st.D[x * N + i] = v;  // unmerged x: D is symmetric again
  }
}

// K4 for pair P = (i, k) (after K3 of the same pair: it reads row i's absorbed columns): the
// entries between two pairs merged in the same round, computed by the lower survivor i < x of
// Q = (x, l): D[i][x] = D[x][i] = avg_Q(avg_P(D[i][x], D[k][x]), avg_P(D[i][l], D[k][l]))
// (inner average over the lower-representative pair, outer over the other).
__device__ __forceinline__ void fix_update(const DenseState& st, int64_t b, int64_t x0, int64_t dx) {
  const int64_t N = st.N;
  const int64_t i = st.pairs[b];
  const int64_t k = st.mate[i];
  const double ni = st.size[i], nk = st.size[k];
  double* Di = st.D + i * N;
  const double* Dk = st.D + k * N;
  for (int64_t x = x0; x < N; x += dx) {
    if (x <= i || x == k || !st.active[x]) continue;
    const int64_t mx = st.mate[x];
    if (mx < 0 || mx < x) continue;  // unmerged or absorbed: done in K3
    const double inner = average_update_rn(Di[x], Dk[x], ni, nk);
    const double v = average_update_rn(inner, Di[mx], st.size[x], st.size[mx]);
    Di[x] = v;
    st.D[x * N + i] = v;
  }
}

// K5 for pair slot b: sizes, deactivate the absorbed cluster, parent link.
__device__ __forceinline__ void finalize_one(const DenseState& st, int64_t b) {
  const int32_t i = st.pairs[b];
  const int32_t k = st.mate[i];
  st.size[i] = st.size[i] + st.size[k];
  st.active[k] = 0;
  st.parent[k] = i;
  st.mate[i] = -1;
  st.mate[k] = -1;
}

// ---- multi-block rounds: two launches each ----------------------------------------------------

// K1 + K2 of round `round`: one block per row finds nn[i]; the block that finishes last
// decides the pairs (the grid's blocks never wait for one another).
__global__ void __launch_bounds__(kRowThreads)
search_decide_kernel(DenseState st, int round, const int32_t* __restrict__ prev_count, int32_t* cur_count,
                     int32_t* done, double threshold) {
  const int32_t prev = *prev_count;
  if (prev == 0) return;  // uniform over the grid: converged, nothing changed
  const int64_t i = blockIdx.x;
  if (st.active[i]) {  // uniform over the block
    double bv = INFINITY;
    int64_t bj = INT64_MAX;
    search_part(st, i, round, prev, threadIdx.x, blockDim.x, bv, bj);
    block_best<false>(bv, bj);
    if (threadIdx.x == 0) {
      st.nn[i] = (bj == INT64_MAX) ? -1 : static_cast<int32_t>(bj);
      st.nnd[i] = bv;
    }
  }
  if (!last_block_done(done)) return;
  for (int64_t x = threadIdx.x; x < st.N; x += blockDim.x) decide_one(st, x, cur_count, threshold, round);
}

// K3 + K4 of the round's pairs (each block takes slots b = blockIdx.x, + gridDim.x, ...); the
// block that finishes last runs K5.
__global__ void __launch_bounds__(kRowThreads)
update_kernel(DenseState st, const int32_t* __restrict__ cur_count, int32_t* done) {
  const int32_t count = *cur_count;
  if (count == 0) return;  // uniform over the grid
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) row_update(st, b, threadIdx.x, blockDim.x);
  __syncthreads();  // K4 of a pair reads what K3 of the same pair wrote
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) fix_update(st, b, threadIdx.x, blockDim.x);
  if (!last_block_done(done)) return;
  for (int64_t b = threadIdx.x; b < count; b += blockDim.x) finalize_one(st, b);
}

// ---- the tail: the remaining rounds in one block -------------------------------------------

// Runs rounds `round`, `round + 1`, ... until one merges nothing, if the chunk's last round
// (*last_count) still merged. counter: one device int of scratch. Each thread searches whole
// rows (better_min is a total order: the sequential scan finds what the block reduction finds).
__global__ void __launch_bounds__(kTailThreads)
dense_tail_kernel(DenseState st, int round, const int32_t* __restrict__ last_count, int32_t* counter,
                  double threshold) {
  int32_t prev = *last_count;
  if (prev == 0) return;  // uniform: the chunk converged
  const int64_t N = st.N, t = threadIdx.x, T = blockDim.x;
  for (;; ++round) {
    for (int64_t i = t; i < N; i += T) {
      if (!st.active[i]) continue;
      double bv = INFINITY;
      int64_t bj = INT64_MAX;
      search_part(st, i, round, prev, 0, 1, bv, bj);
      st.nn[i] = (bj == INT64_MAX) ? -1 : static_cast<int32_t>(bj);
      st.nnd[i] = bv;
    }
    if (t == 0) *counter = 0;
    __syncthreads();
    for (int64_t i = t; i < N; i += T) decide_one(st, i, counter, threshold, round);
    __syncthreads();
    const int32_t count = *counter;  // read by every thread before anyone resets it
    if (count == 0) return;          // uniform: every thread read the same count
    for (int64_t b = 0; b < count; ++b) row_update(st, b, t, T);
    __syncthreads();
    for (int64_t b = 0; b < count; ++b) fix_update(st, b, t, T);
    __syncthreads();
    for (int64_t b = t; b < count; b += T) finalize_one(st, b);
    __syncthreads();
    prev = count;
  }
}

// ---- the distance matrix ---------------------------------------------------------------------

// D from a contiguous float32 (N, N) matrix src: D[i][j] = D[j][i] = src[i][j] for j > i (the
// upper triangle, as scikit-learn passes it to scipy), D[i][i] = 0.
__global__ void build_dense_kernel(const float* __restrict__ src, double* __restrict__ D, int64_t N) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= N * N) return;
  const int64_t i = e / N, j = e % N;
  if (j < i) return;
  if (j == i) { D[i * N + i] = 0.0; return; }
  const double v = static_cast<double>(src[e]);
  D[i * N + j] = v;
  D[j * N + i] = v;
}

// Row i of D (one block per row) from the float32 Gram row stored in the first half of its own
// bytes (float j of the row at byte 8 N i + 4 j, j in [i, N)): D[i][j] = 1 - clamp(g, -1, 1)
// widened to float64 for j > i, D[i][i] = 0; the lower triangle is left to the mirror step.
// In place, so the columns go in descending chunks, each read wholly before it is written:
// writing doubles [a, b) overwrites floats [2a, 2b), which lie at or above a, all already read
// (this chunk before the barrier, the chunks above it earlier); rows never touch each other.
constexpr int kWidenThreads = 256;
constexpr int kWidenPerThread = 8;

__global__ void __launch_bounds__(kWidenThreads) widen_gram_kernel(double* __restrict__ D, int64_t N) {
  const int64_t i = blockIdx.x;
  double* Di = D + i * N;
  const float* Gi = reinterpret_cast<const float*>(Di);
  const int64_t T = blockDim.x, span = T * kWidenPerThread;
  for (int64_t b = N; b > i;) {  // uniform over the block: i, N and the chunks are
    const int64_t a = b - span > i ? b - span : i;
    float v[kWidenPerThread];
#pragma unroll
    for (int k = 0; k < kWidenPerThread; ++k) {
      const int64_t j = a + threadIdx.x + k * T;
      v[k] = j < b ? Gi[j] : 0.f;
    }
    __syncthreads();  // the whole chunk is read before any of it is overwritten
#pragma unroll
    for (int k = 0; k < kWidenPerThread; ++k) {
      const int64_t j = a + threadIdx.x + k * T;
      if (j >= b) continue;
      const float c = v[k] < -1.f ? -1.f : (v[k] > 1.f ? 1.f : v[k]);  // NaN stays NaN, like torch's clamp
      Di[j] = j == i ? 0.0 : static_cast<double>(1.f - c);
    }
    b = a;
  }
}

// Every cluster a singleton (size 1, active, its own parent, no neighbour, never merged), and
// the round counters of round_counts_init. With `mirror`, block i also copies row i's upper
// triangle into column i (the widened Gram matrix holds only the upper one): the grid then has
// at least N blocks.
__global__ void init_state_kernel(DenseState st, int32_t* counts, int64_t slots, bool mirror) {
  if (mirror && blockIdx.x < st.N) {  // uniform over the block
    const int64_t i = blockIdx.x, N = st.N;
    for (int64_t j = i + 1 + threadIdx.x; j < N; j += blockDim.x) st.D[j * N + i] = st.D[i * N + j];
  }
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x < slots) round_counts_init(counts, x);
  if (x >= st.N) return;
  st.size[x] = 1.0;
  st.active[x] = 1;
  st.nn[x] = -1;
  st.mate[x] = -1;
  st.parent[x] = static_cast<int32_t>(x);
  st.touched[x] = -1;
}

void enqueue_rounds(const DenseState& st, int32_t* counts, int rounds, double threshold, cudaStream_t stream) {
  const int64_t N = st.N;
  const unsigned int pair_blocks = static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(N / 2, kMaxPairBlocks)));
  int32_t* done = counts + rounds + 2;
  for (int r = 0; r < rounds; ++r) {
    const int32_t* prev = counts + r;
    int32_t* cur = counts + r + 1;
    INSID3_LAUNCH(search_decide_kernel, static_cast<unsigned int>(N), kRowThreads, 0, stream)(st, r, prev, cur, done,
                                                                                              threshold);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    INSID3_LAUNCH(update_kernel, pair_blocks, kRowThreads, 0, stream)(st, cur, done);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The size in bytes of the (N, N) double matrix, overflow-checked.
int64_t dense_bytes(int64_t N, const char* op) {
  return insid3::checked_mul(insid3::checked_mul(N, N, op, "the dense matrix N * N"), 8, op,
                             "the size in bytes of the N * N distances");
}

// Core: D is a contiguous (N, N) double matrix on the device (overwritten), symmetric, or
// only its upper triangle set with `mirror` (the init kernel mirrors it first).
at::Tensor cluster_dense(at::Tensor D, double threshold, bool mirror) {
  const int64_t N = D.size(0);
  auto opts = D.options();
  // Uninitialised buffers, set by one kernel (init_state_kernel) instead of one fill each.
  auto size = at::empty({N}, opts);
  auto nnd = at::empty({N}, opts);
  auto active = at::empty({N}, opts.dtype(at::kByte));
  auto ints = at::empty({4, N}, opts.dtype(at::kInt));  // nn, mate, parent, touched
  auto pairs = at::empty({std::max<int64_t>(1, N / 2)}, opts.dtype(at::kInt));
  auto parent = ints.select(0, 2);

  int32_t* ip = ints.data_ptr<int32_t>();
  DenseState st{D.data_ptr<double>(), N, size.data_ptr<double>(), active.data_ptr<uint8_t>(), ip,
                nnd.data_ptr<double>(), ip + N, ip + 2 * N, pairs.data_ptr<int32_t>(), ip + 3 * N};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int rounds = static_cast<int>(INSID3_TUNABLE("average_linkage.first_chunk_rounds", kFirstChunkRounds));
  auto counts = at::empty({round_count_slots(rounds)}, opts.dtype(at::kInt));
  int32_t* c = counts.data_ptr<int32_t>();
  const unsigned int state_blocks = grid_1d(std::max<int64_t>(N, round_count_slots(rounds)), kPointThreads);
  const unsigned int init_blocks = mirror ? std::max<unsigned int>(state_blocks, static_cast<unsigned int>(N))
                                          : state_blocks;
  INSID3_LAUNCH(init_state_kernel, init_blocks, kPointThreads, 0, stream)(st, c, round_count_slots(rounds), mirror);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  enqueue_rounds(st, c, rounds, threshold, stream);
  INSID3_LAUNCH(dense_tail_kernel, 1, kTailThreads, 0, stream)(st, rounds, c + rounds, c + rounds + 1, threshold);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return labels_from_parent(parent);
}

at::Tensor average_linkage_precomputed_cuda(const at::Tensor& dist, double threshold) {
  constexpr const char* op = "average_linkage_precomputed";
  check_cuda_tensor(dist, op, "dist", at::kFloat, 2);
  TORCH_CHECK(dist.size(0) == dist.size(1), op, ": dist must be square (N, N), got ", dist.sizes());
  TORCH_CHECK(dist.size(0) < (int64_t(1) << 31), op, ": N must be < 2^31");
  insid3::check_threshold(threshold, op);
  c10::cuda::CUDAGuard guard(dist.device());
  const int64_t N = dist.size(0);
  dense_bytes(N, op);
  const auto d = dist.contiguous();
  check_finite(d, op, "dist");
  if (N == 0) return at::empty({0}, dist.options().dtype(at::kLong));
  auto D = at::empty({N, N}, dist.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  INSID3_LAUNCH(build_dense_kernel, grid_1d(N * N, kPointThreads), kPointThreads, 0, stream)(
      d.data_ptr<float>(), D.data_ptr<double>(), N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return cluster_dense(D, threshold, false);
}

at::Tensor average_linkage_cuda(const at::Tensor& features, double threshold, bool bf16x6) {
  constexpr const char* op = "average_linkage";
  check_cuda_tensor(features, op, "features", at::kFloat, 2);
  TORCH_CHECK(features.size(0) < (int64_t(1) << 31), op, ": N must be < 2^31");
  insid3::check_threshold(threshold, op);
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t N = features.size(0), C = features.size(1);
  dense_bytes(N, op);
  if (bf16x6)
    insid3::checked_mul(insid3::checked_mul(N, C, op, "the features' size N * C"), 2 * insid3::kBf16x6GramBlocks, op,
                        "the size in bytes of the bf16x6 operand, 14 N C");
  const auto X = features.contiguous();
  check_dot_inputs(X, "features", X, "features", X.size(1), op);
  if (N == 0) return at::empty({0}, features.options().dtype(at::kLong));
  auto D = at::empty({N, N}, features.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = INSID3_TUNABLE("average_linkage.gram_rows", kGramRows);
  // D's storage read as (N, 2N) floats: the Gram row blocks go into the first half of their rows.
  auto G = D.view(at::kFloat);
  // bf16x6: the shared Gram buffer S (N, 7C) of common/bf16x6.h, its left and right operands
  // two views of it (one kernel, no other copy).
  at::Tensor S, left, right;
  if (bf16x6) {
    S = bf16x6_operand(X, insid3::kBf16x6Gram, insid3::kBf16x6GramBlocks, false);
    left = S.narrow(1, insid3::kBf16x6GramLeft * C, insid3::kBf16x6Blocks * C);
    right = S.narrow(1, insid3::kBf16x6GramRight * C, insid3::kBf16x6Blocks * C);
  }
  {
    at::NoTF32Guard no_tf32;  // float32 distances, as on the CPU (no TF32 rounding)
    for (int64_t i0 = 0; i0 < N; i0 += rows) {  // trip count from shapes only
      const int64_t B = std::min(rows, N - i0);
      // Rows [i0, i0 + B) against rows [i0, N): the CPU kernel's GEMM blocks; the output view
      // (row stride 2N) is one cuBLAS leading dimension, written in place.
      auto out = G.narrow(0, i0, B).narrow(1, i0, N - i0);
      if (bf16x6)
        bf16x6_gemm(out, left.narrow(0, i0, B), right.narrow(0, i0, N - i0).t());
      else
        at::mm_out(out, X.narrow(0, i0, B), X.narrow(0, i0, N - i0).t());
    }
  }
  // Chunks of blockDim.x * kWidenPerThread columns; the emulation's tests shrink the block so
  // that the rows of small N span several chunks.
  const int widen_threads = static_cast<int>(INSID3_TUNABLE("average_linkage.widen_threads", kWidenThreads));
  TORCH_CHECK(widen_threads > 0 && widen_threads <= kWidenThreads && widen_threads % kWarp == 0, op,
              ": bad widen block size ", widen_threads);
  INSID3_LAUNCH(widen_gram_kernel, static_cast<unsigned int>(N), widen_threads, 0, stream)(D.data_ptr<double>(), N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return cluster_dense(D, threshold, true);
}

// ---- labels ---------------------------------------------------------------------------------

__global__ void find_root_kernel(const int32_t* __restrict__ parent, int64_t N, int32_t* __restrict__ root,
                                 int32_t* __restrict__ is_root) {
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x >= N) return;
  int32_t r = static_cast<int32_t>(x);
  while (parent[r] != r) r = parent[r];  // parent[k] < k: the chain is strictly decreasing
  root[x] = r;
  is_root[x] = (parent[x] == x) ? 1 : 0;
}

__global__ void label_kernel(const int32_t* __restrict__ root, const int64_t* __restrict__ csum, int64_t N,
                             int64_t* __restrict__ labels) {
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x >= N) return;
  labels[x] = csum[root[x]] - 1;  // inclusive count of roots up to and including ours
}

}  // namespace

at::Tensor labels_from_parent(const at::Tensor& parent) {
  const int64_t N = parent.size(0);
  auto labels = at::empty({N}, parent.options().dtype(at::kLong));
  if (N == 0) return labels;
  auto root = at::empty({N}, parent.options());
  auto is_root = at::empty({N}, parent.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  INSID3_LAUNCH(find_root_kernel, grid_1d(N, kPointThreads), kPointThreads, 0, stream)(
      parent.data_ptr<int32_t>(), N, root.data_ptr<int32_t>(), is_root.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto csum = at::cumsum(is_root, 0, at::kLong).contiguous();
  INSID3_LAUNCH(label_kernel, grid_1d(N, kPointThreads), kPointThreads, 0, stream)(
      root.data_ptr<int32_t>(), csum.data_ptr<int64_t>(), N, labels.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return labels;
}

}  // namespace insid3_cuda

INSID3_CUDA_LIBRARY_IMPL(m) {
  m.impl("average_linkage_precomputed", &insid3_cuda::average_linkage_precomputed_cuda);
  m.impl("average_linkage", &insid3_cuda::average_linkage_cuda);
}
