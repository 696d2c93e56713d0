// The library insid3_fast_emu: the insid3_fast schemas again (their kernels are csrc/cuda/*.cu
// built for the emulation, registered under the CPU key) plus the emulator's test controls.
#include <c10/core/Allocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>

#include "common/schemas.h"
#include "cuda_emu.h"

namespace {
constexpr char kNamespace[] = "insid3_fast_emu";

int64_t emu_launch_count() { return static_cast<int64_t>(cuda_emu::launch_count()); }
void emu_set_capturing(bool on) { cuda_emu::set_capturing(on); }
// Peak bytes held by CPU tensors allocated on this thread between emu_peak_begin and
// emu_peak_end: the allocator reports every allocation and free to the thread's profiler-state
// debug info, which this meter takes the place of. On the emulated backend these are the
// tensors the launchers would allocate on the GPU (the emulator's own stacks are not tensors).
struct PeakMeter : c10::MemoryReportingInfoBase {
  int64_t current = 0, peak = 0;
  void reportMemoryUsage(void*, int64_t alloc_size, size_t, size_t, c10::Device) override {
    current += alloc_size;
    peak = std::max(peak, current);
  }
  bool memoryProfilingEnabled() const override { return true; }
};

void emu_peak_begin() {
  c10::ThreadLocalDebugInfo::_push(c10::DebugInfoKind::PROFILER_STATE, std::make_shared<PeakMeter>());
}

int64_t emu_peak_end() {
  auto info = c10::ThreadLocalDebugInfo::_pop(c10::DebugInfoKind::PROFILER_STATE);
  auto* meter = dynamic_cast<PeakMeter*>(info.get());
  TORCH_CHECK(meter != nullptr, "emu_peak_end without emu_peak_begin (or a profiler started in between)");
  return meter->peak;
}

// Hides the meter (pushes an empty PROFILER_STATE) only when the meter is what is installed: a
// profiler's own state is left alone.
bool hide_meter() {
  if (dynamic_cast<PeakMeter*>(c10::ThreadLocalDebugInfo::get(c10::DebugInfoKind::PROFILER_STATE)) == nullptr)
    return false;
  c10::ThreadLocalDebugInfo::_push(c10::DebugInfoKind::PROFILER_STATE, nullptr);
  return true;
}

void emu_set_tunable(c10::string_view name, int64_t value) { cuda_emu::set_tunable(std::string(name).c_str(), value); }
}  // namespace

namespace cuda_emu {
EmulationScratch::EmulationScratch() : hidden_(hide_meter()) {}
EmulationScratch::~EmulationScratch() {
  if (hidden_) c10::ThreadLocalDebugInfo::_pop(c10::DebugInfoKind::PROFILER_STATE);
}
}  // namespace cuda_emu

TORCH_LIBRARY(insid3_fast_emu, m) {
  insid3::define_ops(m);
  // Kernel launches so far (all grids of this library).
  m.def("emu_launch_count() -> int", &emu_launch_count);
  // Make c10::cuda::currentStreamCaptureStatusMayInitCtx report a capture (the graph-capture branch).
  m.def("emu_set_capturing(bool on) -> ()", &emu_set_capturing);
  // Override a host-side constant of the kernels (INSID3_TUNABLE); value < 0 restores it.
  m.def("emu_set_tunable(str name, int value) -> ()", &emu_set_tunable);
  // Peak tensor bytes allocated on this thread in between (not nestable, not with the profiler).
  m.def("emu_peak_begin() -> ()", &emu_peak_begin);
  m.def("emu_peak_end() -> int", &emu_peak_end);
}

TORCH_LIBRARY_IMPL(insid3_fast_emu, CompositeExplicitAutograd, m) {
  m.impl("cluster_and_vote", &insid3::cluster_and_vote_composite<kNamespace>);
}
