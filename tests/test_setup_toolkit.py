"""setup.py's choice of kernels: a complete CUDA toolkit adds the CUDA kernels, an incomplete one
(an nvcc wrapper without libcudart, a missing folder) builds the CPU kernels alone with a message.
The toolkits are fake folders; nothing is compiled."""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import pytest
import setuptools

SETUP_PY = Path(__file__).resolve().parents[1] / "setup.py"


def _load_setup(monkeypatch):
    """Import setup.py as a module (not as __main__), recording any call to setuptools.setup."""
    calls = []
    monkeypatch.setattr(setuptools, "setup", lambda *a, **k: calls.append((a, k)))
    spec = importlib.util.spec_from_file_location("insid3_fast_setup_under_test", SETUP_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, calls


@pytest.fixture
def setup_py(monkeypatch):
    module, calls = _load_setup(monkeypatch)
    assert calls == [], "importing setup.py ran setup(): guard it with if __name__ == '__main__'"
    return module


def _toolkit(root: Path, *, nvcc: bool = True, executable: bool = True, lib: str | None = "lib64") -> Path:
    """A fake toolkit folder: bin/nvcc (a wrapper script) and <lib>/libcudart.so.13 as asked."""
    root.mkdir(parents=True)
    if nvcc:
        (root / "bin").mkdir()
        script = root / "bin" / "nvcc"
        script.write_text('#!/bin/sh\nexec /nonexistent/cuda/bin/nvcc "$@"\n')
        if executable:
            script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    if lib is not None:
        (root / lib).mkdir()
        (root / lib / "libcudart.so.13").write_bytes(b"")
    return root


def test_importing_setup_py_builds_nothing(monkeypatch):
    _, calls = _load_setup(monkeypatch)
    assert calls == []


def test_complete_toolkit_has_no_problem(setup_py, tmp_path):
    assert setup_py.cuda_toolkit_problem(str(_toolkit(tmp_path / "cuda-13.0"))) is None
    # torch links from lib/ when lib64/ is absent (conda-style layouts)
    assert setup_py.cuda_toolkit_problem(str(_toolkit(tmp_path / "conda", lib="lib"))) is None


def test_nvcc_wrapper_without_libcudart_is_incomplete(setup_py, tmp_path):
    # what torch guesses from /usr/local/bin/nvcc being a wrapper script: /usr/local
    problem = setup_py.cuda_toolkit_problem(str(_toolkit(tmp_path / "local", lib=None)))
    assert problem is not None and "libcudart" in problem


@pytest.mark.parametrize("case", ["unset", "missing_folder", "empty_folder", "nvcc_not_executable",
                                  "libcudart_only"])
def test_incomplete_toolkits(setup_py, tmp_path, case):
    root = {
        "unset": None,
        "missing_folder": str(tmp_path / "nowhere"),
        "empty_folder": str(_toolkit(tmp_path / "empty", nvcc=False, lib=None)),
        "nvcc_not_executable": str(_toolkit(tmp_path / "noexec", executable=False)),
        "libcudart_only": str(_toolkit(tmp_path / "libonly", nvcc=False)),
    }[case]
    problem = setup_py.cuda_toolkit_problem(root)
    assert problem is not None
    assert ("nvcc" in problem) if root else ("no CUDA toolkit" in problem)


def test_complete_toolkits_filters_and_deduplicates(setup_py, tmp_path):
    good = _toolkit(tmp_path / "cuda-13.0")
    bad = _toolkit(tmp_path / "local", lib=None)
    link = tmp_path / "cuda"
    link.symlink_to(good)
    assert setup_py.complete_toolkits([str(bad), str(link), str(good)]) == [str(good.resolve())]


def _patch_torch(monkeypatch, cuda_home):
    import torch
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None if cuda_home is None else str(cuda_home))
    for name in ("INSID3_FAST_NO_EXTENSION", "INSID3_FAST_NO_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUDA_HOME", "" if cuda_home is None else str(cuda_home))


def _sources(ext) -> list[str]:
    return [os.path.basename(s) for s in ext.sources]


def test_incomplete_toolkit_builds_cpu_kernels_with_one_message(setup_py, tmp_path, monkeypatch, capsys):
    _patch_torch(monkeypatch, _toolkit(tmp_path / "wrapper_only", lib=None))
    [ext], cmdclass = setup_py._extensions()
    assert "build_ext" in cmdclass
    assert "ops.cpp" in _sources(ext) and "nn_vote.cpp" in _sources(ext)  # the CPU kernels
    assert not any(s.endswith(".cu") for s in ext.sources)                 # no CUDA kernels
    err = capsys.readouterr().err
    assert err.count("insid3_fast:") == 1
    assert "CPU kernels only" in err and "libcudart" in err and "CUDA_HOME=" in err


def test_no_toolkit_at_all_builds_cpu_kernels(setup_py, monkeypatch, capsys):
    _patch_torch(monkeypatch, None)
    [ext], _ = setup_py._extensions()
    assert not any(s.endswith(".cu") for s in ext.sources)
    assert "no CUDA toolkit" in capsys.readouterr().err


def test_complete_toolkit_builds_cuda_kernels_with_ptx(setup_py, tmp_path, monkeypatch, capsys):
    _patch_torch(monkeypatch, _toolkit(tmp_path / "cuda-13.0"))
    [ext], _ = setup_py._extensions()
    assert "nn_vote.cu" in _sources(ext) and "nn_vote.cpp" in _sources(ext)
    assert capsys.readouterr().err == ""
    # the newest architecture also ships PTX, so newer GPUs compile the kernels at load time
    arch = os.environ["TORCH_CUDA_ARCH_LIST"]
    assert arch == setup_py.DEFAULT_CUDA_ARCH_LIST and arch.split(";")[-1].endswith("+PTX")
    flags = [f for args in ext.extra_compile_args.values() for f in args]
    assert "-DINSID3_WITH_CUDA" not in flags  # never read by the sources


@pytest.mark.parametrize("why", ["cpu_only_torch", "INSID3_FAST_NO_CUDA"])
def test_cpu_only_torch_or_opt_out_is_silent(setup_py, tmp_path, monkeypatch, capsys, why):
    import torch

    _patch_torch(monkeypatch, _toolkit(tmp_path / "wrapper_only", lib=None))
    if why == "cpu_only_torch":
        monkeypatch.setattr(torch.version, "cuda", None)
    else:
        monkeypatch.setenv("INSID3_FAST_NO_CUDA", "1")
    [ext], _ = setup_py._extensions()
    assert not any(s.endswith(".cu") for s in ext.sources)
    assert capsys.readouterr().err == ""


def test_no_unused_build_dependencies():
    """The ops register with TORCH_LIBRARY: no source includes pybind11, no requirement names it
    or cupy, and setup.py passes no -DINSID3_WITH_CUDA (no source reads it)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = SETUP_PY.parent
    sources = [p for p in root.glob("csrc/**/*") if p.suffix in (".cpp", ".h", ".cu", ".cuh")]
    assert sources
    for path in sources:
        text = path.read_text()
        assert "pybind11" not in text and "INSID3_WITH_CUDA" not in text, path
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    requirements = [*meta["build-system"]["requires"], *meta["project"]["dependencies"],
                    *(r for extra in meta["project"]["optional-dependencies"].values() for r in extra)]
    assert not [r for r in requirements if "pybind11" in r or "cupy" in r]
    assert "cupy" not in meta["project"]["optional-dependencies"]
    assert "INSID3_WITH_CUDA" not in SETUP_PY.read_text()
