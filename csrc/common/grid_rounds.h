// The reciprocal-nearest-neighbour round rule of grid_average_linkage, shared by the CPU
// and CUDA kernels.
//
// Semantics (our own definition of connectivity-constrained average linkage):
//  * Items are the h*w patches of a row-major grid (p = row * w + col). Clusters start as
//    single patches. A cluster's id is its smallest patch index; it keeps its size n and the
//    double sum s of its members' features.
//  * Two clusters are adjacent when some member of one is a grid neighbour of some member of
//    the other (4-connectivity: up/down/left/right; 8: plus the diagonals).
//  * Linkage d(A, B) = sum_linkage(s_A, s_B, C, n_A, n_B) = 1 - <s_A, s_B> / (n_A n_B).
//  * One round: every cluster A picks its nearest adjacent cluster nn(A) with better_min
//    (smallest d, ties to the smallest id). Every reciprocal pair (nn(A) = B, nn(B) = A) with
//    d(A, B) < threshold merges: the merged cluster takes the smaller id, sums are added
//    (s_small + s_large), sizes add. All of a round's merges use the linkages computed at
//    the start of the round. Rounds repeat until one merges nothing.
//  * Labels are numbered by first appearance (relabel.h).
#pragma once
#include <cstdint>
#include "macros.h"

namespace insid3 {

// Grid edge `dir` of patch p (0 right, 1 down; for 8-connectivity also 2 down-right, 3
// down-left): every grid edge is listed once, from its smaller end. Writes the other end to
// *q and returns true when that neighbour exists.
INSID3_HD bool grid_edge(int64_t p, int dir, int64_t h, int64_t w, int64_t* q) {
  const int64_t r = p / w, c = p % w;
  const int64_t nr = r + (dir == 0 ? 0 : 1);
  const int64_t nc = c + (dir == 0 || dir == 2 ? 1 : (dir == 1 ? 0 : -1));
  if (nr >= h || nc < 0 || nc >= w) return false;
  *q = nr * w + nc;
  return true;
}

// Edges per patch: 2 (4-connectivity) or 4 (8-connectivity).
INSID3_HD int grid_edges_per_patch(int connectivity) { return connectivity == 8 ? 4 : 2; }

// Grid neighbours of patch p with a larger index, in grid_edge order. Writes up to 4 indices
// to out and returns how many.
INSID3_HD int grid_forward_neighbours(int64_t p, int64_t h, int64_t w, int connectivity, int64_t* out) {
  int k = 0;
  for (int dir = 0; dir < grid_edges_per_patch(connectivity); ++dir) {
    if (grid_edge(p, dir, h, w, out + k)) ++k;
  }
  return k;
}

// Does the round merge cluster a with its nearest neighbour b = nn[a]? True for exactly one
// side of each merging pair (the smaller id, which survives).
INSID3_HD bool round_merges(int64_t a, int64_t b, int64_t nn_of_b, double d_ab, double threshold) {
  return b >= 0 && a < b && nn_of_b == a && d_ab < threshold;
}

}  // namespace insid3
