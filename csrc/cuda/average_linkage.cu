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
// Termination without host synchronisation: the host enqueues a fixed number of rounds;
// every kernel of round r first reads count[r] (merges made in round r-1; count[0] = 1) and
// exits at once when it is 0, so finished rounds cost only their launches. After the chunk
// ONE 4-byte read (a sync) checks whether the last round still merged; if so (rare: a chunk
// is sized well above the 25-40 rounds measured for N <= 4096), more chunks run, each checked
// the same way. While the stream is being captured into a CUDA graph that check cannot run
// and is skipped (the first chunk's result is returned; see kFirstChunkRounds).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include "cuda/cuda_utils.cuh"

namespace insid3_cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kPointThreads = 256;
constexpr int kFirstChunkRounds = 64;
constexpr int kMoreChunkRounds = 32;
constexpr int kMaxPairBlocks = 2048;

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
  if (i >= st.N || !st.active[i]) return;
  const int32_t j = st.nn[i];
  if (j <= i || st.nn[j] != i) return;  // j == -1 fails j <= i; only the lower index acts
  if (!(st.nnd[i] < threshold)) return;  // merge iff linkage < threshold (NaN never merges)
  const int32_t slot = atomicAdd(cur_count, 1);
  st.pairs[slot] = static_cast<int32_t>(i);
  st.mate[i] = j;
  st.mate[j] = static_cast<int32_t>(i);
}

// Row pass: row i <- average of rows i and k, over every active column (absorbed columns
// included, the fix pass needs them). Rows of different pairs are disjoint: no race.
__global__ void __launch_bounds__(kRowThreads)
row_pass_kernel(DenseState st, const int32_t* __restrict__ cur_count) {
  const int32_t count = *cur_count;
  const int64_t N = st.N;
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    const int64_t i = st.pairs[b];
    const int64_t k = st.mate[i];
    const double ni = st.size[i], nk = st.size[k];
    double* Di = st.D + i * N;
    const double* Dk = st.D + k * N;
    for (int64_t x = threadIdx.x; x < N; x += blockDim.x) {
      if (x != i && x != k && st.active[x]) Di[x] = average_update_rn(Di[x], Dk[x], ni, nk);
    }
  }
}

// Fix pass (after the row pass): mirror row i into column i for unmerged x, and finish the
// entries between two merged pairs. Writes D[i][j], D[j][i] only for i < j and reads only
// rows of survivors at columns that no other thread writes (see the header comment).
__global__ void __launch_bounds__(kRowThreads)
fix_pass_kernel(DenseState st, const int32_t* __restrict__ cur_count) {
  const int32_t count = *cur_count;
  const int64_t N = st.N;
  for (int64_t b = blockIdx.x; b < count; b += gridDim.x) {
    const int64_t i = st.pairs[b];
    const int64_t k = st.mate[i];
    double* Di = st.D + i * N;
    for (int64_t x = threadIdx.x; x < N; x += blockDim.x) {
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
}

__global__ void finalize_kernel(DenseState st, const int32_t* __restrict__ cur_count) {
  const int32_t count = *cur_count;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < count;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t i = st.pairs[b];
    const int32_t k = st.mate[i];
    st.size[i] = st.size[i] + st.size[k];
    st.active[k] = 0;
    st.parent[k] = i;
    st.mate[i] = -1;
    st.mate[k] = -1;
  }
}

// Enqueue `rounds` rounds; counts has rounds + 1 entries, counts[0] != 0 unless converged.
void enqueue_rounds(const DenseState& st, int32_t* counts, int rounds, double threshold, cudaStream_t stream) {
  const int64_t N = st.N;
  const unsigned int pair_blocks = static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(N / 2, kMaxPairBlocks)));
  for (int r = 0; r < rounds; ++r) {
    const int32_t* prev = counts + r;
    int32_t* cur = counts + r + 1;
    nn_search_kernel<<<static_cast<unsigned int>(N), kRowThreads, 0, stream>>>(st, prev);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    decide_kernel<<<grid_1d(N, kPointThreads), kPointThreads, 0, stream>>>(st, prev, cur, threshold);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    row_pass_kernel<<<pair_blocks, kRowThreads, 0, stream>>>(st, cur);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fix_pass_kernel<<<pair_blocks, kRowThreads, 0, stream>>>(st, cur);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_kernel<<<grid_1d(N / 2 + 1, kPointThreads), kPointThreads, 0, stream>>>(st, cur);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
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

  auto counts = at::zeros({kFirstChunkRounds + 1}, opts.dtype(at::kInt));
  counts.narrow(0, 0, 1).fill_(1);
  enqueue_rounds(st, counts.data_ptr<int32_t>(), kFirstChunkRounds, threshold, stream);

  // Completion check (documented sync, see the header). Skipped under CUDA graph capture.
  if (!c10::cuda::isStreamCapturingMayInitCtx(stream)) {
    int last_rounds = kFirstChunkRounds;
    while (counts[last_rounds].item<int32_t>() != 0) {
      auto more = at::zeros({kMoreChunkRounds + 1}, opts.dtype(at::kInt));
      more.narrow(0, 0, 1).fill_(1);
      enqueue_rounds(st, more.data_ptr<int32_t>(), kMoreChunkRounds, threshold, stream);
      counts = more;
      last_rounds = kMoreChunkRounds;
    }
  }
  return labels_from_parent(parent);
}

// Symmetric double copy of dist built from its strict upper triangle (scikit-learn passes
// only the condensed upper triangle to scipy); the diagonal is never read.
at::Tensor symmetric_double(const at::Tensor& dist) {
  auto U = at::triu(dist.to(at::kDouble), 1);
  return (U + U.t()).contiguous();
}

at::Tensor average_linkage_precomputed_cuda(const at::Tensor& dist, double threshold) {
  constexpr const char* op = "insid3_fast::average_linkage_precomputed (CUDA)";
  check_cuda_tensor(dist, op, "dist", at::kFloat, 2);
  TORCH_CHECK(dist.size(0) == dist.size(1), op, ": dist must be square (N, N), got ", dist.sizes());
  TORCH_CHECK(dist.size(0) < (int64_t(1) << 31), op, ": N must be < 2^31");
  c10::cuda::CUDAGuard guard(dist.device());
  const int64_t N = dist.size(0);
  if (N == 0) return at::empty({0}, dist.options().dtype(at::kLong));
  return cluster_dense(symmetric_double(dist.contiguous()), threshold);
}

at::Tensor average_linkage_cuda(const at::Tensor& features, double threshold) {
  constexpr const char* op = "insid3_fast::average_linkage (CUDA)";
  check_cuda_tensor(features, op, "features", at::kFloat, 2);
  TORCH_CHECK(features.size(0) < (int64_t(1) << 31), op, ": N must be < 2^31");
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t N = features.size(0);
  if (N == 0) return at::empty({0}, features.options().dtype(at::kLong));
  const auto X = features.contiguous();
  at::Tensor gram;
  {
    at::NoTF32Guard no_tf32;  // float32 distances, as on the CPU (no TF32 rounding)
    gram = at::mm(X, X.t());
  }
  // dist = 1 - clamp(X X^T, -1, 1), in float32
  const auto dist = at::rsub(at::clamp(gram, -1.0, 1.0), 1.0);
  return cluster_dense(symmetric_double(dist), threshold);
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
  find_root_kernel<<<grid_1d(N, kPointThreads), kPointThreads, 0, stream>>>(
      parent.data_ptr<int32_t>(), N, root.data_ptr<int32_t>(), is_root.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto csum = at::cumsum(is_root, 0, at::kLong).contiguous();
  label_kernel<<<grid_1d(N, kPointThreads), kPointThreads, 0, stream>>>(
      root.data_ptr<int32_t>(), csum.data_ptr<int64_t>(), N, labels.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return labels;
}

}  // namespace insid3_cuda

TORCH_LIBRARY_IMPL(insid3_fast, CUDA, m) {
  m.impl("average_linkage_precomputed", &insid3_cuda::average_linkage_precomputed_cuda);
  m.impl("average_linkage", &insid3_cuda::average_linkage_cuda);
}
