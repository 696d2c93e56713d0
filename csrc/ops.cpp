// The insid3_fast library: the module init of insid3_fast._C and the schemas (common/schemas.h).
// Kernels register per backend in cpu/<op>.cpp and cuda/<op>.cu with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

#include "common/schemas.h"

extern "C" {
// Importing insid3_fast._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
constexpr char kNamespace[] = "insid3_fast";
}

TORCH_LIBRARY(insid3_fast, m) { insid3::define_ops(m); }

TORCH_LIBRARY_IMPL(insid3_fast, CompositeExplicitAutograd, m) {
  m.impl("cluster_and_vote", &insid3::cluster_and_vote_composite<kNamespace>);
}
