// cuda_emu shim: "capturing" is a switch the tests flip (cuda_emu::set_capturing) to run the
// launchers' graph-capture branch.
#pragma once
#include <cuda_runtime.h>
#include "cuda_emu.h"

namespace c10::cuda {
enum class CaptureStatus : int { None = 0, Active = 1, Invalidated = 2 };
inline CaptureStatus currentStreamCaptureStatusMayInitCtx() {
  return ::cuda_emu::capturing() ? CaptureStatus::Active : CaptureStatus::None;
}
}  // namespace c10::cuda
