"""Builds insid3_fast and its torch extension insid3_fast._C.

The CPU kernels are always built. The CUDA kernels are added whenever a CUDA-enabled
torch and a CUDA toolkit (CUDA_HOME) are present, even without a GPU. Environment:
  INSID3_FAST_NO_EXTENSION=1  pure-Python install (the reference path only)
  INSID3_FAST_NO_CUDA=1       CPU kernels only
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0")
  MAX_JOBS                    parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions() -> tuple[list, dict]:
    if _flag("INSID3_FAST_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
    with_cuda = (
        not _flag("INSID3_FAST_NO_CUDA")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cuda_sources)
    )
    cxx = ["-O3", "-fopenmp", "-std=c++20"]
    kwargs = dict(
        name="insid3_fast._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DINSID3_WITH_CUDA"],
                                "nvcc": ["-O3", "-std=c++20", "-DINSID3_WITH_CUDA",
                                         "--expt-relaxed-constexpr"]},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
