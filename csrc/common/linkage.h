// Linkage formulas and tie rules shared by the CPU and CUDA clustering kernels.
#pragma once
#include <cmath>
#include <cstdint>
#include "macros.h"

namespace insid3 {

// Average linkage (Lance-Williams), written exactly as scipy's `_average` so the merge
// heights match scipy's bit for bit: d(k, x u y) = (nx d(k,x) + ny d(k,y)) / (nx + ny).
INSID3_HD double average_update(double d_xi, double d_yi, double nx, double ny) {
  return (nx * d_xi + ny * d_yi) / (nx + ny);
}

// Is (d, j) a nearer neighbour than (best_d, best_j)? Smaller distance wins, ties to the lower index.
INSID3_HD bool better_min(double d, int64_t j, double best_d, int64_t best_j) {
  return d < best_d || (d == best_d && j < best_j);
}

// Average cosine distance between clusters of unit vectors from their sum vectors:
// 1 - <sum_a, sum_b> / (na nb). The dot is a sequential fma in double, the same order on
// every backend, so CPU and CUDA compute identical linkages.
INSID3_HD double sum_linkage(const double* sa, const double* sb, int64_t C, double na, double nb) {
  double acc = 0.0;
  for (int64_t k = 0; k < C; ++k) acc = fma(sa[k], sb[k], acc);
  return 1.0 - acc / (na * nb);
}

}  // namespace insid3
