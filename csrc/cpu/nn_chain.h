// scipy's nearest-neighbour-chain average linkage (scipy.cluster._hierarchy.nn_chain,
// method='average') on a condensed float64 distance matrix, and the distance-threshold cut
// scikit-learn applies to its result.
//
// The loop structure, the chain start, the tie preferences and the distance update are
// scipy's, so the merges (pairs and heights) are bit-identical to scipy.cluster.hierarchy.
// linkage(..., 'average'). Merges are reported as scipy's unsorted rows (x < y are the
// matrix positions of the two clusters; y survives and stands for the union).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// scipy's update (nx d_xi + ny d_yi) / (nx + ny) must not be fused into an fma, whatever
// -march the extension is built with.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
#include "common/linkage.h"
#include "common/relabel.h"

namespace insid3_cpu {

struct Merge {
  int64_t x, y;
  double height;
};

// Condensed layout: entry (i, j), i < j, lives at row_off[i] + j (scipy's condensed_index).
inline std::vector<int64_t> condensed_row_offsets(int64_t n) {
  std::vector<int64_t> off(n > 0 ? n : 1);
  for (int64_t i = 0; i < n; ++i) off[i] = n * i - i * (i + 1) / 2 - i - 1;
  return off;
}

// Runs the chain on D (modified in place, n * (n - 1) / 2 entries); returns the n - 1 merges.
inline std::vector<Merge> nn_chain_average(double* D, int64_t n) {
  std::vector<Merge> merges;
  if (n < 2) return merges;
  merges.reserve(n - 1);
  const std::vector<int64_t> off = condensed_row_offsets(n);
  std::vector<int> size(n, 1);
  // Live positions in increasing order: scanning them visits the same indices, in the same
  // order, as scipy's scan over all positions that skips dead ones.
  std::vector<int64_t> alive(n);
  for (int64_t i = 0; i < n; ++i) alive[i] = i;
  std::vector<int64_t> chain;
  chain.reserve(n);

  auto at = [&](int64_t i, int64_t j) -> double& { return i < j ? D[off[i] + j] : D[off[j] + i]; };

  for (int64_t k = 0; k < n - 1; ++k) {
    if (chain.empty()) chain.push_back(alive[0]);
    int64_t x = 0, y = 0;
    double current_min = 0.0;
    while (true) {
      x = chain.back();
      const int64_t L = static_cast<int64_t>(chain.size());
      // Prefer the previous chain element among equals (scipy: avoids cycles on ties).
      if (L > 1) {
        y = chain[L - 2];
        current_min = at(x, y);
      } else {
        current_min = INFINITY;
      }
      const int64_t na = static_cast<int64_t>(alive.size());
      int64_t a = 0;
      for (; a < na && alive[a] < x; ++a) {  // column part: D[i, x], i < x
        const int64_t i = alive[a];
        const double dist = D[off[i] + x];
        if (dist < current_min) {
          current_min = dist;
          y = i;
        }
      }
      const double* row = D + off[x];
      for (++a; a < na; ++a) {  // row part: D[x, i], i > x (alive[a] == x was skipped)
        const int64_t i = alive[a];
        const double dist = row[i];
        if (dist < current_min) {
          current_min = dist;
          y = i;
        }
      }
      if (L > 1 && y == chain[L - 2]) break;
      chain.push_back(y);
    }
    chain.pop_back();
    chain.pop_back();
    if (x > y) std::swap(x, y);  // fastcluster's convention, as scipy
    const int nx = size[x], ny = size[y];
    merges.push_back({x, y, current_min});
    size[x] = 0;
    size[y] = nx + ny;
    // Sequential on purpose: a thread team per merge costs more than it saves (measured).
    for (const int64_t i : alive) {
      if (i == x || i == y) continue;
      double& dy = at(i, y);
      dy = insid3::average_update(at(i, x), dy, static_cast<double>(nx), static_cast<double>(ny));
    }
    alive.erase(std::lower_bound(alive.begin(), alive.end(), x));
  }
  return merges;
}

// Labels (first appearance) of the partition made by every merge with height < threshold:
// scikit-learn's distance_threshold cut of scipy's sorted tree (rows with height >= threshold
// sit at the end of the stable sort and are the ones it undoes).
inline void cut_merges(const std::vector<Merge>& merges, int64_t n, double threshold, int64_t* labels) {
  std::vector<int64_t> parent(n);
  for (int64_t i = 0; i < n; ++i) parent[i] = i;
  auto find = [&](int64_t i) {
    while (parent[i] != i) i = parent[i] = parent[parent[i]];
    return i;
  };
  for (const Merge& m : merges) {
    if (!(m.height < threshold)) continue;
    const int64_t a = find(m.x), b = find(m.y);
    if (a != b) parent[a < b ? b : a] = a < b ? a : b;
  }
  std::vector<int64_t> root(n), scratch(n);
  for (int64_t i = 0; i < n; ++i) root[i] = find(i);
  insid3::relabel_first_appearance(root.data(), n, scratch.data(), labels);
}

}  // namespace insid3_cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
