// cuda_emu shim: "capturing" is a switch the tests flip (cuda_emu::set_capturing) to run the
// launchers' graph-capture branch.
#pragma once
#include <cuda_runtime.h>
#include "cuda_emu.h"

namespace c10::cuda {
inline bool isStreamCapturingMayInitCtx(cudaStream_t) { return ::cuda_emu::capturing(); }
}  // namespace c10::cuda
