"""Builds insid3_fast and its torch extension insid3_fast._C.

The CPU kernels are always built. The CUDA kernels are added whenever a CUDA-enabled torch and a
complete CUDA toolkit are present, even without a GPU. The toolkit is the folder torch's
cpp_extension picked (CUDA_HOME or CUDA_PATH, else the folder above the `nvcc` on PATH, else
/usr/local/cuda); it must hold bin/nvcc and lib64/ (or lib/) libcudart.so*. An incomplete one (an
`nvcc` wrapper script on PATH guesses /usr/local, which has no libcudart) would fail at link and
lose the CPU kernels too, so then the CPU kernels are built alone and one message says why.
Environment:
  INSID3_FAST_NO_EXTENSION=1  pure-Python install (the reference path only)
  INSID3_FAST_NO_CUDA=1       CPU kernels only
  CUDA_HOME                   the CUDA toolkit root, e.g. /usr/local/cuda-13.0
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0+PTX": the PTX lets newer GPUs
                              compile the kernels at load time)
  MAX_JOBS                    parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def cuda_toolkit_problem(root: str | None) -> str | None:
    """Say what keeps ``root`` from being a CUDA toolkit the extension can build against.

    Returns None when ``root`` holds an executable ``bin/nvcc`` and ``lib64/libcudart.so*`` (or
    ``lib/libcudart.so*``, where torch links from when lib64/ is absent), else one sentence.
    """
    if not root:
        return ("no CUDA toolkit was found (CUDA_HOME is unset, no nvcc is on PATH and "
                "/usr/local/cuda does not exist)")
    nvcc = os.path.join(root, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
        return f"{root!r} has no executable bin/nvcc"
    if not any(glob.glob(os.path.join(root, lib, "libcudart.so*")) for lib in ("lib64", "lib")):
        return f"{root!r} has bin/nvcc but no lib64/libcudart.so* (an nvcc wrapper, not a toolkit)"
    return None


def complete_toolkits(candidates: list[str]) -> list[str]:
    """The candidate folders that are complete CUDA toolkits, in order, without duplicates."""
    found: list[str] = []
    for root in candidates:
        root = os.path.realpath(root)
        if root not in found and cuda_toolkit_problem(root) is None:
            found.append(root)
    return found


def _incomplete_toolkit_message(problem: str) -> str:
    source = ("from $CUDA_HOME" if os.environ.get("CUDA_HOME") else
              "from $CUDA_PATH" if os.environ.get("CUDA_PATH") else "torch's guess")
    found = complete_toolkits(sorted(glob.glob("/usr/local/cuda*")))
    example = found[0] if found else "/usr/local/cuda-13.0"
    return (f"insid3_fast: building the CPU kernels only, without the CUDA kernels: the CUDA toolkit "
            f"({source}) is incomplete: {problem}. To build the CUDA kernels, set CUDA_HOME to the "
            f"toolkit root (the folder with bin/nvcc and lib64/libcudart.so), e.g. "
            f"CUDA_HOME={example}"
            + (f" (found here: {', '.join(found)})" if found else "")
            + ", and build again; INSID3_FAST_NO_CUDA=1 builds the CPU kernels without this message.")


def _extensions() -> tuple[list, dict]:
    if _flag("INSID3_FAST_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
    with_cuda = not _flag("INSID3_FAST_NO_CUDA") and torch.version.cuda is not None and bool(cuda_sources)
    if with_cuda:
        problem = cuda_toolkit_problem(cpp_extension.CUDA_HOME)
        if problem is not None:
            print(_incomplete_toolkit_message(problem), file=sys.stderr, flush=True)
            with_cuda = False
    cxx = ["-O3", "-fopenmp", "-std=c++20"]
    kwargs = dict(
        name="insid3_fast._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        ext = cpp_extension.CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx,
                                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


# setuptools (pip, `python setup.py ...`) runs this file as __main__; tests import it for the
# functions above without building anything.
if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    # The licence is set here (pyproject.toml lists it as dynamic): the TOML-table form is
    # deprecated from setuptools 77 on (unsupported after 2027-02-18), and the SPDX string that
    # replaces it is an error before 77; this keyword builds without a warning on both.
    setup(ext_modules=ext_modules, cmdclass=cmdclass, license="Apache-2.0")
