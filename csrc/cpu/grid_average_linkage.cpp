// CPU kernel of insid3_fast::grid_average_linkage: connectivity-constrained average linkage
// on an h x w grid by reciprocal-nearest-neighbour rounds. The rule (adjacency, linkage,
// ties, merge order) is defined in common/grid_rounds.h and shared with the CUDA kernel.
//
// Each cluster keeps its double sum vector, its size and a list of adjacent clusters with
// their cached linkage, sorted by id. After a round only the linkages that involve a merged
// cluster are recomputed.
//
// Input rule: h, w >= 0 with h * w (overflow-checked) equal to features.size(0); connectivity
// 4 or 8; features finite (any finite float32 is handled: sums and dots are in double, which
// float32 inputs cannot overflow); threshold not NaN. Errors name the op (cpu/checks.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "common/grid_rounds.h"
#include "common/linkage.h"
#include "common/relabel.h"
#include "cpu/checks.h"
#include "cpu/checks.h"

namespace {

using Adj = std::vector<std::pair<int64_t, double>>;  // (neighbour id, linkage), sorted by id

struct PairTask {
  int64_t a, b;
  double* out;
};

// Four sum_linkage dots at once, <sa[u], sb[u]>: each keeps sum_linkage's sequential fma order
// (bit-identical results) while the four chains hide the fma latency. When the four pairs share
// their left operand (a merged cluster against its neighbours) it is loaded once.
#define INSID3_DOTS4_BODY(FMA)                                               \
  double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;                             \
  if (sa[0] == sa[1] && sa[0] == sa[2] && sa[0] == sa[3]) {                  \
    const double* s = sa[0];                                                 \
    for (int64_t k = 0; k < C; ++k) {                                        \
      const double v = s[k];                                                 \
      a0 = FMA(v, sb[0][k], a0);                                             \
      a1 = FMA(v, sb[1][k], a1);                                             \
      a2 = FMA(v, sb[2][k], a2);                                             \
      a3 = FMA(v, sb[3][k], a3);                                             \
    }                                                                        \
  } else {                                                                   \
    for (int64_t k = 0; k < C; ++k) {                                        \
      a0 = FMA(sa[0][k], sb[0][k], a0);                                      \
      a1 = FMA(sa[1][k], sb[1][k], a1);                                      \
      a2 = FMA(sa[2][k], sb[2][k], a2);                                      \
      a3 = FMA(sa[3][k], sb[3][k], a3);                                      \
    }                                                                        \
  }                                                                          \
  acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;

void dots4_generic(const double* const* sa, const double* const* sb, int64_t C, double* acc) {
  INSID3_DOTS4_BODY(std::fma)
}
// Without -mfma, std::fma is a library call; this copy lets the compiler emit the instruction.
__attribute__((target("avx2,fma"))) void dots4_fma(const double* const* sa, const double* const* sb, int64_t C,
                                                    double* acc) {
  INSID3_DOTS4_BODY(__builtin_fma)
}
#undef INSID3_DOTS4_BODY

// Fills *task.out = sum_linkage(s_a, s_b, C, n_a, n_b) for every task.
void compute_linkages(std::vector<PairTask>& tasks, const std::vector<double>& sums,
                      const std::vector<int64_t>& size, int64_t C) {
  static const bool hw_fma = __builtin_cpu_supports("fma");
  const int64_t T = static_cast<int64_t>(tasks.size());
  const double* s = sums.data();
  // Threads only for big batches (in practice the first round): a thread team per round costs
  // more than it saves when the cores are shared (measured: 7x slower on a busy 2-core box).
  // Arithmetic only: nothing in the region allocates or throws.
#pragma omp parallel for schedule(dynamic, 4) if (T * C > (int64_t(1) << 22))
  for (int64_t t0 = 0; t0 < T; t0 += 4) {
    const double* sa[4];
    const double* sb[4];
    for (int u = 0; u < 4; ++u) {
      const PairTask& p = tasks[std::min(t0 + u, T - 1)];
      sa[u] = s + p.a * C;
      sb[u] = s + p.b * C;
    }
    double acc[4];
    if (hw_fma)
      dots4_fma(sa, sb, C, acc);
    else
      dots4_generic(sa, sb, C, acc);
    for (int u = 0; u < 4 && t0 + u < T; ++u) {
      const PairTask& p = tasks[t0 + u];
      *p.out = 1.0 - acc[u] / (static_cast<double>(size[p.a]) * static_cast<double>(size[p.b]));
    }
  }
}

double* find_entry(Adj& adj, int64_t id) {
  auto it = std::lower_bound(adj.begin(), adj.end(), id,
                             [](const std::pair<int64_t, double>& e, int64_t v) { return e.first < v; });
  TORCH_INTERNAL_ASSERT(it != adj.end() && it->first == id, "grid_average_linkage: asymmetric adjacency");
  return &it->second;
}

// Computes every NaN (stale) linkage once and mirrors it. Tasks are listed from the merged
// cluster's side (the dot is symmetric), so runs of tasks share that cluster's sum; a pair of
// two merged (or two initial) clusters is listed from its smaller id. `clusters` must hold
// both ends of every stale entry.
void refresh_linkages(std::vector<Adj>& adj, const std::vector<int64_t>& clusters, const std::vector<char>& changed,
                      const std::vector<double>& sums, const std::vector<int64_t>& size, int64_t C) {
  std::vector<PairTask> tasks;
  for (const int64_t c : clusters)
    for (auto& e : adj[c]) {
      if (!std::isnan(e.second)) continue;
      const bool from_c = changed[c] == changed[e.first] ? c < e.first : changed[c] != 0;
      if (from_c) tasks.push_back({c, e.first, &e.second});
    }
  compute_linkages(tasks, sums, size, C);
  for (const PairTask& p : tasks) *find_entry(adj[p.b], p.a) = *p.out;
}

at::Tensor grid_average_linkage_impl(const at::Tensor& features, int64_t h, int64_t w, int64_t connectivity,
                                     double threshold) {
  constexpr const char* kOp = "grid_average_linkage";
  TORCH_CHECK(features.device().is_cpu(), "grid_average_linkage (CPU): features must be a CPU tensor");
  TORCH_CHECK(features.scalar_type() == at::kFloat, "grid_average_linkage: features must be float32, got ",
              features.scalar_type());
  TORCH_CHECK(h >= 0 && w >= 0, "grid_average_linkage: h and w must be >= 0, got ", h, " and ", w);
  const int64_t n = insid3_cpu::checked_mul(h, w, kOp, "the grid size h * w");
  TORCH_CHECK(features.dim() == 2 && features.size(0) == n,
              "grid_average_linkage: features must be (h*w, C) = (", n, ", C), got ", features.sizes());
  TORCH_CHECK(connectivity == 4 || connectivity == 8, "grid_average_linkage: connectivity must be 4 or 8, got ",
              connectivity);
  insid3_cpu::check_threshold(threshold, kOp);
  const int64_t C = features.size(1);
  at::Tensor labels = at::empty({n}, features.options().dtype(at::kLong));
  if (n == 0) return labels;

  const at::Tensor X = features.contiguous();
  insid3_cpu::finite_absmax(X, kOp, "features");
  const float* xp = X.data_ptr<float>();
  std::vector<double> sums(insid3_cpu::checked_mul(n, C, kOp, "the number of feature values h * w * C"));
  for (int64_t i = 0; i < n * C; ++i) sums[i] = static_cast<double>(xp[i]);
  std::vector<int64_t> size(n, 1), parent(n), alive(n);
  for (int64_t i = 0; i < n; ++i) parent[i] = alive[i] = i;

  std::vector<Adj> adj(n);
  for (int64_t p = 0; p < n; ++p) {
    int64_t q[4];
    const int k = insid3::grid_forward_neighbours(p, h, w, static_cast<int>(connectivity), q);
    for (int u = 0; u < k; ++u) {
      adj[p].push_back({q[u], NAN});
      adj[q[u]].push_back({p, NAN});
    }
  }
  for (auto& a : adj) std::sort(a.begin(), a.end());
  std::vector<char> changed(n, 0);  // merged this round
  refresh_linkages(adj, alive, changed, sums, size, C);

  std::vector<int64_t> nn(n, -1), partner(n, -1), rep(n);
  std::vector<double> nd(n, INFINITY);
  std::vector<int64_t> seen(n, 0), touched;
  int64_t stamp = 0;
  for (int64_t i = 0; i < n; ++i) rep[i] = i;
  while (true) {
    const int64_t A = static_cast<int64_t>(alive.size());
    for (int64_t t = 0; t < A; ++t) {
      const int64_t c = alive[t];
      int64_t best = -1;
      double best_d = INFINITY;
      for (const auto& e : adj[c])
        if (best < 0 || insid3::better_min(e.second, e.first, best_d, best)) best = e.first, best_d = e.second;
      nn[c] = best;
      nd[c] = best_d;
    }
    std::vector<std::pair<int64_t, int64_t>> merges;
    for (const int64_t a : alive)
      if (nn[a] >= 0 && insid3::round_merges(a, nn[a], nn[nn[a]], nd[a], threshold)) merges.push_back({a, nn[a]});
    if (merges.empty()) break;

    const int64_t Mg = static_cast<int64_t>(merges.size());
    // Arithmetic only: nothing in the region allocates or throws.
#pragma omp parallel for if (Mg * C > (int64_t(1) << 20))
    for (int64_t t = 0; t < Mg; ++t) {
      const int64_t a = merges[t].first, b = merges[t].second;
      double* sa = sums.data() + a * C;
      const double* sb = sums.data() + b * C;
      for (int64_t k = 0; k < C; ++k) sa[k] = sa[k] + sb[k];
    }
    for (const auto& m : merges) {
      const int64_t a = m.first, b = m.second;
      size[a] += size[b];
      size[b] = 0;
      parent[b] = a;
      rep[b] = a;
      partner[a] = b;
      changed[a] = 1;
    }
    alive.erase(std::remove_if(alive.begin(), alive.end(), [&](int64_t c) { return size[c] == 0; }), alive.end());

    // Only the merged clusters and their neighbours have stale lists: every other cluster's
    // neighbours and linkages are unchanged.
    ++stamp;
    touched.clear();
    auto touch = [&](int64_t c) {
      if (seen[c] != stamp) seen[c] = stamp, touched.push_back(c);
    };
    for (const auto& m : merges) {
      touch(m.first);
      for (const auto& e : adj[m.first]) touch(rep[e.first]);
      for (const auto& e : adj[m.second]) touch(rep[e.first]);
    }
    const int64_t Tn = static_cast<int64_t>(touched.size());
    insid3_cpu::OmpError error;  // the merged lists allocate: caught in the region, rethrown after it
#pragma omp parallel for schedule(dynamic, 16) if (Tn > 4096)
    for (int64_t t = 0; t < Tn; ++t) {
      if (error.failed()) continue;
      try {
        const int64_t c = touched[t];
        Adj& own = adj[c];
        if (changed[c]) {  // the union of both lists, every linkage stale
          Adj out;
          out.reserve(own.size() + adj[partner[c]].size());
          for (const Adj* src : {&own, &adj[partner[c]]})
            for (const auto& e : *src)
              if (rep[e.first] != c) out.push_back({rep[e.first], NAN});
          own.swap(out);
        } else {  // a neighbour merged: rename it, its linkage is stale
          for (auto& e : own)
            if (changed[rep[e.first]]) e = {rep[e.first], NAN};
        }
        std::sort(own.begin(), own.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
        own.erase(std::unique(own.begin(), own.end(), [](const auto& x, const auto& y) { return x.first == y.first; }),
                  own.end());
      } catch (...) {
        error.capture();
      }
    }
    error.rethrow();
    refresh_linkages(adj, touched, changed, sums, size, C);
    for (const auto& m : merges) {
      Adj().swap(adj[m.second]);
      rep[m.second] = m.second;
      changed[m.first] = 0;
    }
  }

  std::vector<int64_t> root(n), scratch(n);
  for (int64_t p = 0; p < n; ++p) {
    int64_t r = p;
    while (parent[r] != r) r = parent[r];
    root[p] = r;
    parent[p] = r;
  }
  insid3::relabel_first_appearance(root.data(), n, scratch.data(), labels.data_ptr<int64_t>());
  return labels;
}

at::Tensor grid_average_linkage_cpu(const at::Tensor& features, int64_t h, int64_t w, int64_t connectivity,
                                    double threshold) {
  return insid3_cpu::guard_alloc("grid_average_linkage",
                                 [&] { return grid_average_linkage_impl(features, h, w, connectivity, threshold); });
}

}  // namespace

TORCH_LIBRARY_IMPL(insid3_fast, CPU, m) { m.impl("grid_average_linkage", &grid_average_linkage_cpu); }
