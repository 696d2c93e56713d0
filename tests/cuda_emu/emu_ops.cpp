// The library insid3_fast_emu: the insid3_fast schemas again (their kernels are csrc/cuda/*.cu
// built for the emulation, registered under the CPU key) plus the emulator's test controls.
#include <torch/library.h>

#include "common/schemas.h"
#include "cuda_emu.h"

namespace {
constexpr char kNamespace[] = "insid3_fast_emu";

int64_t emu_launch_count() { return static_cast<int64_t>(cuda_emu::launch_count()); }
void emu_set_capturing(bool on) { cuda_emu::set_capturing(on); }
void emu_set_tunable(c10::string_view name, int64_t value) { cuda_emu::set_tunable(std::string(name).c_str(), value); }
}  // namespace

TORCH_LIBRARY(insid3_fast_emu, m) {
  insid3::define_ops(m);
  // Kernel launches so far (all grids of this library).
  m.def("emu_launch_count() -> int", &emu_launch_count);
  // Make c10::cuda::isStreamCapturingMayInitCtx report a capture (the graph-capture branch).
  m.def("emu_set_capturing(bool on) -> ()", &emu_set_capturing);
  // Override a host-side constant of the kernels (INSID3_TUNABLE); value < 0 restores it.
  m.def("emu_set_tunable(str name, int value) -> ()", &emu_set_tunable);
}

TORCH_LIBRARY_IMPL(insid3_fast_emu, CompositeExplicitAutograd, m) {
  m.impl("cluster_and_vote", &insid3::cluster_and_vote_composite<kNamespace>);
}
