// Schemas of every insid3_fast op, in one place. Kernels register per backend
// in cpu/<op>.cpp and cuda/<op>.cu with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing insid3_fast._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(insid3_fast, m) {
  // Reverse nearest-neighbour voting. queries (Q, C), keys (S, M, C) float32,
  // key_mask (S, M) bool, active (Q,) bool. For every active query q and shot s,
  // argmax[s, q] = argmax_j <keys[s, j], queries[q]> (exact, ties to the lowest j);
  // votes[q] = number of shots whose argmax falls inside key_mask[s]. Inactive
  // queries get argmax -1 and 0 votes.
  m.def("nn_vote(Tensor queries, Tensor keys, Tensor key_mask, Tensor active) -> (Tensor votes, Tensor argmax)");
  // Exact average linkage on a precomputed (N, N) float32 distance matrix, cut so
  // that every merge with linkage distance < threshold is made. Labels (N,) int64,
  // numbered by first appearance.
  m.def("average_linkage_precomputed(Tensor dist, float threshold) -> Tensor");
  // Same on L2-normalised features (N, C): dist = 1 - clamp(X X^T, -1, 1) in float32.
  m.def("average_linkage(Tensor features, float threshold) -> Tensor");
  // average_linkage(features, threshold) and nn_vote(queries, keys, key_mask, active) in one
  // call: (labels, votes, argmax), equal to the two ops'. The CPU kernel overlaps the sequential
  // clustering with the voting; the CUDA kernel runs the two ops in a row.
  m.def("cluster_and_vote(Tensor features, float threshold, Tensor queries, Tensor keys, "
        "Tensor key_mask, Tensor active) -> (Tensor labels, Tensor votes, Tensor argmax)");
  // Connectivity-constrained average linkage on an h x w grid (4 or 8 neighbours),
  // reciprocal-nearest-neighbour rounds on the true average distance.
  m.def("grid_average_linkage(Tensor features, int h, int w, int connectivity, float threshold) -> Tensor");
}
