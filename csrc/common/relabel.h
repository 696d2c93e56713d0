// Cluster labels numbered by first appearance: item 0 gets label 0, the next item whose
// cluster has not been seen yet gets 1, and so on. Shared by the CPU and CUDA kernels.
#pragma once
#include <cstdint>
#include "macros.h"

namespace insid3 {

// key[i] in [0, n) identifies item i's cluster (e.g. its union-find root); scratch holds n
// int64 values and is overwritten. Writes labels[i]; returns the number of clusters.
INSID3_HD int64_t relabel_first_appearance(const int64_t* key, int64_t n, int64_t* scratch,
                                           int64_t* labels) {
  for (int64_t i = 0; i < n; ++i) scratch[i] = -1;
  int64_t next = 0;
  for (int64_t i = 0; i < n; ++i) {
    int64_t& slot = scratch[key[i]];
    if (slot < 0) slot = next++;
    labels[i] = slot;
  }
  return next;
}

}  // namespace insid3
