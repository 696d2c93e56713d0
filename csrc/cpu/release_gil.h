// Releases the Python GIL for the scope when the calling thread holds it, so that a
// long-running op called from Python lets other Python threads run (e.g. the decoding thread
// of INSID3.stream). Called from C++ without Python, it does nothing.
#pragma once
#include <Python.h>

namespace insid3_cpu {

class MaybeReleaseGIL {
 public:
  MaybeReleaseGIL() {
    if (Py_IsInitialized() && PyGILState_Check()) state_ = PyEval_SaveThread();
  }
  ~MaybeReleaseGIL() {
    if (state_ != nullptr) PyEval_RestoreThread(state_);
  }
  MaybeReleaseGIL(const MaybeReleaseGIL&) = delete;
  MaybeReleaseGIL& operator=(const MaybeReleaseGIL&) = delete;

 private:
  PyThreadState* state_ = nullptr;
};

}  // namespace insid3_cpu
