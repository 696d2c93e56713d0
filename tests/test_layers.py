"""The data flows one way: no module of insid3_fast imports a module of a higher layer.

Every import is counted, also the ones inside functions (lazy imports are still dependencies).
A package (``backbone``, ``eval``, ``testing``) is one unit: its modules may import each other.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "insid3_fast"

# Lower layers first; a module may import its own layer and the ones below.
LAYERS = [
    ["errors"],
    ["inputs", "atomic", "distributed", "keypoints", "quantile", "synthetic", "visualize", "torch_kernels", "crf", "backbone"],
    ["debias"],
    ["config"],
    ["ops", "refine"],
    ["pipeline"],
    ["core", "capture"],
    ["model"],
    ["testing"],
    ["reference", "eval", "bench"],
    ["cli"],
    ["demo"],
    [""],  # the package's __init__: the public API, imported by no module of the package
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    """``insid3_fast.eval.cli`` -> ``eval``; ``insid3_fast`` -> ``""``."""
    parts = module.split(".")[1:]
    return parts[0] if parts else ""


def _imports(path: pathlib.Path, root: pathlib.Path) -> set[str]:
    parts = path.relative_to(root.parent).with_suffix("").parts
    module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if node.module is None:  # `from . import ops`: the names are modules of that package
                found.update(f"{name}.{alias.name}" for alias in node.names)
            else:
                found.add(name)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "insid3_fast" or name.startswith("insid3_fast.")}


def _modules(root: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = _imports(path, root)
    return out


def _violations(modules: dict[str, set[str]]) -> list[str]:
    out = []
    for module, deps in modules.items():
        unit = _unit(module)
        if unit not in RANK:
            continue  # a module this table does not place yet (e.g. another branch's new file)
        for dep in deps:
            dep_unit = _unit(dep)
            if dep_unit == "_C" or dep_unit == unit or dep_unit not in RANK:
                continue
            if RANK[dep_unit] > RANK[unit]:
                out.append(f"{module} imports {dep}")
    return sorted(out)


def test_no_module_imports_a_higher_layer():
    violations = _violations(_modules())
    assert not violations, "imports of a higher layer:\n" + "\n".join(violations)


def test_the_table_places_the_core_modules():
    units = {_unit(m) for m in _modules()}
    for unit in ("pipeline", "core", "model", "config", "ops", "torch_kernels", "testing", "cli", "bench"):
        assert unit in units and unit in RANK, unit


def test_the_check_sees_function_level_and_relative_imports(tmp_path):
    fake = tmp_path / "insid3_fast"
    fake.mkdir()
    (fake / "pipeline.py").write_text("import torch\n\ndef f():\n    from .model import INSID3\n    from . import ops\n")
    modules = _modules(fake)
    assert modules["insid3_fast.pipeline"] == {"insid3_fast.model", "insid3_fast.ops"}
    assert _violations(modules) == ["insid3_fast.pipeline imports insid3_fast.model"]
