"""Detector proofs of the CUDA emulation: each class of GPU bug, planted in a small toy kernel
(tests/cuda_emu/toys), must be caught and named (kernel, block, thread); a correct kernel that
uses every primitive must run clean. Select with ``pytest -k "emu and toy"``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from backends import emulation
from cuda_emu import sanitizers

HERE = os.path.dirname(os.path.abspath(__file__))
TOYS = os.path.join(HERE, "cuda_emu", "toys")


def _toy(name: str, n: int = 256) -> torch.Tensor:
    emulation()
    out = torch.arange(n, dtype=torch.float32)
    torch.ops.insid3_fast_emu.toy(name, out)
    return out


def test_emu_toy_correct_kernel_runs_clean():
    out = _toy("block_sum")
    assert out[0].item() == sum(range(256))


def test_emu_toy_launch_within_its_bounds_runs():
    out = _toy("within_bounds", 100)
    assert torch.equal(out, torch.cat([torch.arange(64.0) * 2, torch.arange(64.0, 100.0)]))


def test_kernel_scan_reads_names_bounds_and_templates():
    """The reader of __launch_bounds__ (kernel_scan.py) on the forms the sources use."""
    from cuda_emu.kernel_scan import Kernel, kernels_of

    text = """
    // __global__ void commented_out(int) {}
    template <bool kBf16>
    __global__ void __launch_bounds__(kArgmaxThreads)
        nn_argmax_kernel(const float* s) {}
    __global__ void __launch_bounds__(std::max(64, 32), 2) two_args(int) { if (x) { y(); } }
    __global__ void plain(int n) {}
    """
    assert kernels_of(text) == [Kernel("nn_argmax_kernel", "kArgmaxThreads", True),
                                Kernel("two_args", "std::max(64, 32)", False), Kernel("plain", None, False)]
    # forms a review found misread: a bound before __global__ or after a qualifier, a ternary
    # with a comparison, comment markers in strings, #if 0, a macro's body, a declaration
    assert kernels_of("""
    __launch_bounds__(128) __global__ void a(int) {}
    __global__ static __launch_bounds__(kA > kB ? 128 : 256, 2) void b(int) {}
    const char* s = "/* // */";
    #if 0
    __global__ void dead(int) {}
    #endif
    #define DEF(n) __global__ void n(float* p)
    __global__ void c(int);
    """) == [Kernel("a", "128", False), Kernel("b", "kA > kB ? 128 : 256", False), Kernel("c", None, False)]
    with pytest.raises(ValueError, match="depends on its template parameters"):
        kernels_of("template <int kT>\n__global__ void __launch_bounds__(kT) t(int) {}")


def test_kernel_scan_registers_instantiations_and_namespaces(tmp_path):
    from cuda_emu.kernel_scan import registration_code

    src = tmp_path / "k.cu"
    src.write_text("""
    namespace outer { namespace inner {
    template <typename T, int N>
    __global__ void __launch_bounds__(128) two(T* p) {}
    }}  // namespace outer::inner
    namespace a::b { __global__ void plain(int) {} }
    void host() { INSID3_LAUNCH(two<unsigned int, 4>, 1, 128, 0, s)(p); }
    """)
    code = registration_code(str(src), str(tmp_path))
    assert "using namespace outer;\nusing namespace outer::inner;\nusing namespace a;\nusing namespace a::b;" in code
    assert '(&two<unsigned int, 4>), "two<unsigned int, 4>", static_cast<long>(128));' in code
    assert '(&plain), "plain", 0L);' in code


DETECTED = [
    ("divergent_barrier", r"toy_divergent_barrier.*block \(0,0,0\), thread \(0,0,0\): __syncthreads at .*toys\.cu:\d+ "
                          r"is reached by only part of the block \(32 of 64 threads\): thread \(32,0,0\) exited"),
    ("two_barriers", r"toy_two_barriers.*thread \(1,0,0\): reaches __syncthreads at .*toys\.cu:\d+ while thread "
                     r"\(0,0,0\) waits at a different __syncthreads"),
    ("bad_mask", r"toy_bad_mask.*thread \(16,0,0\): __shfl_down_sync at .*: its mask 0x0000ffff excludes the "
                 r"calling lane 16"),
    ("two_shuffles", r"toy_two_shuffles.*: __shfl_xor_sync at .*toys\.cu:\d+ \(width 32\) meets lane \d+'s "
                     r"__shfl_xor_sync at .*toys\.cu:\d+ \(width 32\): the lanes of one exchange must run the same "
                     r"shuffle"),
    ("exited_lane", r"toy_exited_lane.*thread \(0,0,0\): __shfl_sync at .*: its mask 0xffffffff names lane 16, "
                    r"which has exited"),
    ("read_outside_mask", r"toy_read_outside_mask.*thread \(0,0,0\): __shfl_sync at .* reads lane 20, which is not "
                          r"in its mask 0x0000ffff"),
    ("block_too_large", r"launch of kernel 'toy_block_sum' at .*toys\.cu:\d+: block \(1025,1,1\) exceeds"),
    ("grid_y_too_large", r"launch of kernel 'toy_block_sum' .*grid \(1,65536,1\): y and z are at most 65535"),
    ("dynamic_smem_too_large", r"launch of kernel 'toy_block_sum' .*dynamic shared memory of 50176 bytes exceeds 48 KiB"),
    ("over_bounds", r"launch of kernel 'toy_bounded<2>' at .*toys\.cu:\d+: a block of 128 threads exceeds its "
                    r"__launch_bounds__\(64\)"),
    ("unbounded_over_256", r"launch of kernel 'toy_block_sum' .*: a block of 512 threads, but the kernel declares no "
                           r"__launch_bounds__: above 256 threads"),
]


@pytest.mark.parametrize("name,message", DETECTED, ids=[d[0] for d in DETECTED])
def test_emu_toy_bug_is_caught_and_named(name, message):
    with pytest.raises(RuntimeError, match=message):
        _toy(name)


def test_emu_toy_static_shared_memory_over_48k_is_refused_by_ptxas(tmp_path):
    """g++ cannot size a kernel's static __shared__ data; the real toolchain refuses > 48 KiB."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed: the static shared memory limit is ptxas's check")
    src = os.path.join(TOYS, "big_static_smem.cu")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # no sanitizer runtime in the compiler
    res = subprocess.run([nvcc, "-arch=sm_90", "-cubin", "-o", str(tmp_path / "t.cubin"), src],
                         capture_output=True, text=True, env=env)
    assert res.returncode != 0
    assert "too much shared data" in res.stderr and "toy_big_static_smem" in res.stderr, res.stderr


def _sanitized_toy(mode: str, name: str, **extra_env: str) -> subprocess.CompletedProcess:
    script = os.path.join(HERE, "cuda_emu", "run_toy.py")
    return subprocess.run([sys.executable, script, mode, name], capture_output=True, text=True,
                          env={**sanitizers.env(mode), **extra_env}, timeout=1800)


@pytest.mark.sanitizer
def test_emu_toy_data_race_is_caught_by_tsan():
    res = _sanitized_toy("tsan", "racy")
    assert "WARNING: ThreadSanitizer: data race" in res.stderr, res.stderr[-3000:]
    assert "toy_racy" in res.stderr
    assert "kernel toy_racy block (0,0,0) thread (" in res.stderr  # the racing CUDA threads, named
    assert res.returncode == 66


@pytest.mark.sanitizer
def test_emu_toy_clean_kernel_has_no_tsan_report():
    res = _sanitized_toy("tsan", "block_sum")
    assert "ThreadSanitizer" not in res.stderr, res.stderr[-3000:]
    assert res.returncode == 0


@pytest.mark.sanitizer
def test_emu_toy_out_of_bounds_is_caught_by_asan():
    res = _sanitized_toy("asan", "out_of_bounds")
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in res.stderr, res.stderr[-3000:]
    assert "toy_out_of_bounds" in res.stderr
    assert "the faulting CUDA thread: kernel 'toy_out_of_bounds'" in res.stderr
    assert "block (0,0,0), thread (63,0,0)" in res.stderr
    assert res.returncode != 0


@pytest.mark.sanitizer
def test_emu_toy_kernel_that_never_ends_is_stopped_by_the_watchdog():
    # A hang in OS-thread mode (the sanitizer runs) must end the process with a message that says
    # where the block's threads stand, not run until CI's own limit.
    res = _sanitized_toy("asan", "spin", CUDA_EMU_HANG_SECONDS="2")
    assert "cuda_emu: no progress for 2 s in kernel 'toy_spin'" in res.stderr, res.stderr[-3000:]
    assert "32 of 32 threads running" in res.stderr
    assert "thread (0,0,0) runnable" in res.stderr
    assert res.returncode != 0
