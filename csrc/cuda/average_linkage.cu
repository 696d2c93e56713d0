// CUDA kernels of insid3_fast::average_linkage_precomputed and insid3_fast::average_linkage:
// exact average linkage cut at a distance threshold (every merge with linkage < threshold).
//
// Algorithm: reciprocal-nearest-neighbour (RNN) rounds on a dense N x N double matrix. Average
// linkage is reducible, so merging every reciprocal pair below the threshold per round gives
// the partition of the one-pair-at-a-time algorithm (scipy / scikit-learn), ties broken by
// insid3::better_min (smallest distance, then lowest index). One round:
//   K1 nn_search  : nn[i] = argmin_{active j != i} D[i][j] (one block per row).
//   K2 decide     : i < j = nn[i], nn[j] == i, D[i][j] < threshold -> pair (i absorbs j).
//   K3 row_pass   : row i of each pair P = (i, k): D[i][x] = avg_P(D[i][x], D[k][x]).
//   K4 fix_pass   : restores symmetry: D[x][i] = D[i][x] for unmerged x, and for two pairs
//                   P = (i, k), Q = (j, l) merged in the same round with i < j:
//                   D[i][j] = D[j][i] = avg_Q(avg_P(D[i][j], D[k][j]), avg_P(D[i][l], D[k][l]))
//                   (inner average over the lower-representative pair, outer over the other).
//   K5 finalize   : sizes, deactivate absorbed clusters, parent links.
// avg_P(a, b) = (n_i a + n_k b) / (n_i + n_k) is insid3::average_update (scipy's formula),
// evaluated without fma contraction (average_update_rn) so it equals the CPU value.
// The matrix is symmetric from the start (built from the upper triangle of `dist`, as
// scikit-learn's precomputed path does) and stays symmetric, which also guarantees that each
// round with a mergeable pair merges at least the globally closest one.
//
// Termination without host synchronisation: the host enqueues a fixed chunk of multi-block
// rounds (kFirstChunkRounds, well above the 25-40 rounds measured for N <= 4096); every kernel of
// round r first reads count[r] (merges made in round r-1; count[0] = 1) and exits at once when it
// is 0. Then one single-block kernel (dense_tail_kernel) finishes the clustering if the chunk
// did not: it runs the same round steps (the __device__ functions below) in a loop until a round
// merges nothing. So the result is always the converged partition, on any stream, captured into
// a CUDA graph or not, and the host never reads a device value to get it.
//
// Memory: the (N, N) double matrix D plus O(N) state; the float32 Gram matrix is computed in
// row blocks of kGramRows rows (the CPU kernel's blocks) straight into D, so the peak is
// 8 N^2 + 4 kGramRows N bytes (plus X).
//
// Input rule (common/input_rules.h, the CPU kernels'): the threshold is not NaN; dist finite
// (both triangles, as scikit-learn checks); features finite with C * max|x|^2 < 2^100, so every
// distance is finite. One host read checks it (none under graph capture, see cuda_utils.cuh).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include "cuda/cuda_utils.cuh"

namespace insid3_cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kPointThreads = 256;
constexpr int kTailThreads = 1024;
constexpr int kFirstChunkRounds = 64;
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
};

// ---- the steps of one round, shared by the multi-block kernels and the tail ----------------

// K2: the lower index of a reciprocal pair below the threshold takes a slot.
__device__ __forceinline__ void decide_one(const DenseState& st, int64_t i, int32_t* count, double threshold) {
  if (!st.active[i]) return;
  const int32_t j = st.nn[i];
  if (j <= i || st.nn[j] != i) return;  // j == -1 fails j <= i; only the lower index acts
  if (!(st.nnd[i] < threshold)) return;  // merge iff linkage < threshold (NaN never merges)
  const int32_t slot = atomicAdd(count, 1);
  st.pairs[slot] = static_cast<int32_t>(i);
  st.mate[i] = j;
  st.mate[j] = static_cast<int32_t>(i);
}

// K3 for pair slot b, columns x0, x0 + dx, ...: row i <- average of rows i and k over every
// active column (absorbed columns included, the fix pass needs them). Rows of different pairs
// are disjoint: no race.
__device__ __forceinline__ void row_update(const DenseState& st, int64_t b, int64_t x0, int64_t dx) {
  const int64_t N = st.N;
  const int64_t i = st.pairs[b];
  const int64_t k = st.mate[i];
  const double ni = st.size[i], nk = st.size[k];
  double* Di = st.D + i * N;
  const double* Dk = st.D + k * N;
  for (int64_t x = x0; x < N; x += dx) {
    if (x != i && x != k && st.active[x]) Di[x] = average_update_rn(Di[x], Dk[x], ni, nk);
  }
}

// K4 for pair slot b (after every row update): mirror row i into column i for unmerged x, and
// finish the entries between two merged pairs. Writes D[i][j], D[j][i] only for i < j and reads
// only rows of survivors at columns that no other pair writes (see the header comment).
__device__ __forceinline__ void fix_update(const DenseState& st, int64_t b, int64_t x0, int64_t dx) {
  const int64_t N = st.N;
  const int64_t i = st.pairs[b];
  const int64_t k = st.mate[i];
  double* Di = st.D + i * N;
  for (int64_t x = x0; x < N; x += dx) {
    if (x == i || x == k || !st.active[x]) continue;
    const int64_t mx = st.mate[x];
    if (mx < 0) {
      st.D[x * N + i] = Di[x];  // unmerged x: D is symmetric again
    } else if (mx > x && i < x) {  // x survives pair (x, mx); the lower survivor computes
      const double v = average_update_rn(Di[x], Di[mx], st.size[x], st.size[mx]);
      Di[x] = v;
      st.D[x * N + i] = v;
    }
    // else: x is absorbed this round (its row and column die), or x is a survivor below i
    // (that pair's block writes this entry).
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

// ---- multi-block rounds ---------------------------------------------------------------------

// K1: nn[i] = argmin_{active j != i} D[i][j] (one block per row).
__global__ void __launch_bounds__(kRowThreads)
nn_search_kernel(DenseState st, const int32_t* __restrict__ prev_count) {
  if (*prev_count == 0) return;  // converged: nothing changed in the previous round
  const int64_t i = blockIdx.x;
  if (!st.active[i]) return;     // uniform over the block
  const int64_t N = st.N;
  const double* Di = st.D + i * N;
  double bv = INFINITY;
  int64_t bj = INT64_MAX;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    if (j != i && st.active[j]) {
      const double d = Di[j];
      if (insid3::better_min(d, j, bv, bj)) { bv = d; bj = j; }
    }
  }
  block_best<false>(bv, bj);
  if (threadIdx.x == 0) {
    st.nn[i] = (bj == INT64_MAX) ? -1 : static_cast<int32_t>(bj);
    st.nnd[i] = bv;
  }
}

__global__ void decide_kernel(DenseState st, const int32_t* __restrict__ prev_count, int32_t* cur_count,
                              double threshold) {
  if (*prev_count == 0) return;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < st.N) decide_one(st, i, cur_count, threshold);
}

__global__ void __launch_bounds__(kRowThreads)
row_pass_kernel(DenseState st, const int32_t* __restrict__ cur_count) {
  const int32_t count = *cur_count;
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) row_update(st, b, threadIdx.x, blockDim.x);
}

__global__ void __launch_bounds__(kRowThreads)
fix_pass_kernel(DenseState st, const int32_t* __restrict__ cur_count) {
  const int32_t count = *cur_count;
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) fix_update(st, b, threadIdx.x, blockDim.x);
}

__global__ void finalize_kernel(DenseState st, const int32_t* __restrict__ cur_count) {
  const int32_t count = *cur_count;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < count;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x)
    finalize_one(st, b);
}

// ---- the tail: the remaining rounds in one block -------------------------------------------

// Runs rounds until one merges nothing, if the chunk's last round (*last_count) still merged.
// counter: one device int of scratch. Each thread scans whole rows in the search (better_min is
// a total order, so the sequential scan finds the pair the block reduction finds).
__global__ void __launch_bounds__(kTailThreads)
dense_tail_kernel(DenseState st, const int32_t* __restrict__ last_count, int32_t* counter, double threshold) {
  if (*last_count == 0) return;  // uniform: the chunk converged
  const int64_t N = st.N, t = threadIdx.x, T = blockDim.x;
  for (;;) {
    for (int64_t i = t; i < N; i += T) {
      if (!st.active[i]) continue;
      const double* Di = st.D + i * N;
      double bv = INFINITY;
      int64_t bj = INT64_MAX;
      for (int64_t j = 0; j < N; ++j) {
        if (j != i && st.active[j] && insid3::better_min(Di[j], j, bv, bj)) { bv = Di[j]; bj = j; }
      }
      st.nn[i] = (bj == INT64_MAX) ? -1 : static_cast<int32_t>(bj);
      st.nnd[i] = bv;
    }
    if (t == 0) *counter = 0;
    __syncthreads();
    for (int64_t i = t; i < N; i += T) decide_one(st, i, counter, threshold);
    __syncthreads();
    const int32_t count = *counter;  // read by every thread before anyone resets it
    if (count == 0) return;          // uniform: every thread read the same count
    for (int64_t b = 0; b < count; ++b) row_update(st, b, t, T);
    __syncthreads();
    for (int64_t b = 0; b < count; ++b) fix_update(st, b, t, T);
    __syncthreads();
    for (int64_t b = t; b < count; b += T) finalize_one(st, b);
    __syncthreads();
  }
}

// ---- the distance matrix ---------------------------------------------------------------------

// Rows [r0, r0 + rows) of D from a float32 block src (row r of the block at src + r * ld,
// column c of the block = column c0 + c of D): D[i][j] = D[j][i] = value(src) for j > i (the
// upper triangle, as scikit-learn passes it to scipy), D[i][i] = 0. value = 1 - clamp(g, -1, 1)
// in float32 for a Gram block (NaN stays NaN, like torch's clamp), the entry itself otherwise.
__global__ void build_dense_kernel(const float* __restrict__ src, int64_t ld, int64_t r0, int64_t rows,
                                   int64_t c0, bool gram, double* __restrict__ D, int64_t N) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * (N - c0)) return;
  const int64_t r = e / (N - c0), j = c0 + e % (N - c0), i = r0 + r;
  if (j < i) return;
  if (j == i) { D[i * N + i] = 0.0; return; }
  float v = src[r * ld + (j - c0)];
  if (gram) {
    const float c = v < -1.f ? -1.f : (v > 1.f ? 1.f : v);
    v = 1.f - c;
  }
  D[i * N + j] = static_cast<double>(v);
  D[j * N + i] = static_cast<double>(v);
}

void enqueue_rounds(const DenseState& st, int32_t* counts, int rounds, double threshold, cudaStream_t stream) {
  const int64_t N = st.N;
  const unsigned int pair_blocks = static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(N / 2, kMaxPairBlocks)));
  for (int r = 0; r < rounds; ++r) {
    const int32_t* prev = counts + r;
    int32_t* cur = counts + r + 1;
    INSID3_LAUNCH(nn_search_kernel, static_cast<unsigned int>(N), kRowThreads, 0, stream)(st, prev);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    INSID3_LAUNCH(decide_kernel, grid_1d(N, kPointThreads), kPointThreads, 0, stream)(st, prev, cur, threshold);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    INSID3_LAUNCH(row_pass_kernel, pair_blocks, kRowThreads, 0, stream)(st, cur);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    INSID3_LAUNCH(fix_pass_kernel, pair_blocks, kRowThreads, 0, stream)(st, cur);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    INSID3_LAUNCH(finalize_kernel, grid_1d(N / 2 + 1, kPointThreads), kPointThreads, 0, stream)(st, cur);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The size in bytes of the (N, N) double matrix, overflow-checked.
int64_t dense_bytes(int64_t N, const char* op) {
  return insid3::checked_mul(insid3::checked_mul(N, N, op, "the dense matrix N * N"), 8, op,
                             "the size in bytes of the N * N distances");
}

// Core: D is a contiguous symmetric (N, N) double matrix on the device (overwritten).
at::Tensor cluster_dense(at::Tensor D, double threshold) {
  const int64_t N = D.size(0);
  auto opts = D.options();
  auto size = at::ones({N}, opts);
  auto active = at::ones({N}, opts.dtype(at::kByte));
  auto nn = at::full({N}, -1, opts.dtype(at::kInt));
  auto nnd = at::empty({N}, opts);
  auto mate = at::full({N}, -1, opts.dtype(at::kInt));
  auto parent = at::arange(N, opts.dtype(at::kInt));
  auto pairs = at::empty({std::max<int64_t>(1, N / 2)}, opts.dtype(at::kInt));

  DenseState st{D.data_ptr<double>(), N, size.data_ptr<double>(), active.data_ptr<uint8_t>(),
                nn.data_ptr<int32_t>(), nnd.data_ptr<double>(), mate.data_ptr<int32_t>(),
                parent.data_ptr<int32_t>(), pairs.data_ptr<int32_t>()};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int rounds = static_cast<int>(INSID3_TUNABLE("average_linkage.first_chunk_rounds", kFirstChunkRounds));
  auto counts = round_counts(rounds, opts);
  int32_t* c = counts.data_ptr<int32_t>();
  enqueue_rounds(st, c, rounds, threshold, stream);
  INSID3_LAUNCH(dense_tail_kernel, 1, kTailThreads, 0, stream)(st, c + rounds, c + rounds + 1, threshold);
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
      d.data_ptr<float>(), N, 0, N, 0, false, D.data_ptr<double>(), N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return cluster_dense(D, threshold);
}

at::Tensor average_linkage_cuda(const at::Tensor& features, double threshold) {
  constexpr const char* op = "average_linkage";
  check_cuda_tensor(features, op, "features", at::kFloat, 2);
  TORCH_CHECK(features.size(0) < (int64_t(1) << 31), op, ": N must be < 2^31");
  insid3::check_threshold(threshold, op);
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t N = features.size(0);
  dense_bytes(N, op);
  const auto X = features.contiguous();
  check_dot_inputs(X, "features", X, "features", X.size(1), op);
  if (N == 0) return at::empty({0}, features.options().dtype(at::kLong));
  auto D = at::empty({N, N}, features.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = INSID3_TUNABLE("average_linkage.gram_rows", kGramRows);
  for (int64_t i0 = 0; i0 < N; i0 += rows) {  // trip count from shapes only
    const int64_t B = std::min(rows, N - i0);
    at::Tensor G;
    {
      at::NoTF32Guard no_tf32;  // float32 distances, as on the CPU (no TF32 rounding)
      // Rows [i0, i0 + B) against rows [i0, N): the CPU kernel's GEMM blocks.
      G = at::mm(X.narrow(0, i0, B), X.narrow(0, i0, N - i0).t()).contiguous();
    }
    INSID3_LAUNCH(build_dense_kernel, grid_1d(B * (N - i0), kPointThreads), kPointThreads, 0, stream)(
        G.data_ptr<float>(), N - i0, i0, B, i0, true, D.data_ptr<double>(), N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return cluster_dense(D, threshold);
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
