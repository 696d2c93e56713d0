"""Reads the kernels of a CUDA translation unit and their ``__launch_bounds__`` from its sources.

The emulation compiles the sources unchanged, where ``__launch_bounds__(...)`` expands to
nothing (a C++ compiler has no place for it), so ``build.py`` appends to each translation unit
the code this module writes: every ``__global__`` function of the file and of the csrc headers
it includes, registered with ``cuda_emu::register_kernel`` under its address with the maximum
block size its bound declares (0 where none). The runtime then refuses launches a GPU would
refuse (see ``register_kernel`` in cuda_emu.h).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_INCLUDE = re.compile(r'#\s*include\s+"([^"]+)"')
_NAMESPACE = re.compile(r"\bnamespace\s+([A-Za-z_]\w*)\s*\{")
_GLOBAL = re.compile(r"\b__global__\b")
_IDENT = re.compile(r"\s*([A-Za-z_]\w*)\s*\(")


@dataclass(frozen=True)
class Kernel:
    """One ``__global__`` function: its name, the first argument of its ``__launch_bounds__``
    (a C++ expression; None without one) and whether it is a template."""

    name: str
    bound: str | None
    template: bool


def _strip_comments(text: str) -> str:
    return _COMMENT.sub(" ", text)


def _balanced(text: str, start: int) -> int:
    """The index just past the parenthesis group that opens at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError("unbalanced parentheses after __launch_bounds__")


def _first_argument(args: str) -> str:
    """The first top-level comma-separated argument of ``args`` (the text inside the parentheses)."""
    depth = 0
    for i, ch in enumerate(args):
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        elif ch == "," and depth == 0:
            return args[:i].strip()
    return args.strip()


def _is_template(text: str, at: int) -> bool:
    """Whether the declaration that reaches ``__global__`` at ``at`` began with ``template <...>``."""
    begin = max(text.rfind(";", 0, at), text.rfind("}", 0, at), text.rfind("{", 0, at)) + 1
    return re.match(r"\s*template\s*<", text[begin:at]) is not None


def kernels_of(text: str, where: str = "<source>") -> list[Kernel]:
    """The kernels declared in ``text`` (comments ignored), in order."""
    text = _strip_comments(text)
    out = []
    for m in _GLOBAL.finditer(text):
        pos = m.end()
        rest = re.match(r"\s*void\b", text[pos:])
        if rest is None:
            raise ValueError(f"{where}: a __global__ function must return void")
        pos += rest.end()
        bound = None
        lb = re.match(r"\s*__launch_bounds__\s*(?=\()", text[pos:])
        if lb is not None:
            open_at = pos + lb.end()
            close = _balanced(text, open_at)
            bound = _first_argument(text[open_at + 1:close - 1])
            pos = close
        name = _IDENT.match(text, pos)
        if name is None:
            raise ValueError(f"{where}: cannot read the name of the __global__ function at offset {m.start()}")
        out.append(Kernel(name.group(1), bound, _is_template(text, m.start())))
    return out


def translation_unit(path: str, csrc: str, search: tuple[str, ...] = ()) -> list[str]:
    """``path`` and the project headers it includes (found under ``csrc`` or ``search``), recursively."""
    seen: list[str] = []

    def visit(p: str) -> None:
        p = os.path.realpath(p)
        if p in seen:
            return
        seen.append(p)
        with open(p) as f:
            text = _strip_comments(f.read())
        for inc in _INCLUDE.findall(text):
            for base in (os.path.dirname(p), csrc, *search):
                cand = os.path.join(base, inc)
                if os.path.exists(cand):
                    visit(cand)
                    break

    visit(path)
    return seen


def registration_code(path: str, csrc: str, search: tuple[str, ...] = ()) -> str:
    """C++ to append to the translation unit of ``path``: every kernel registered with its bound."""
    files = translation_unit(path, csrc, search)
    texts = {f: _strip_comments(open(f).read()) for f in files}
    namespaces = sorted({ns for t in texts.values() for ns in _NAMESPACE.findall(t)})
    lines = []
    for f, text in texts.items():
        for k in kernels_of(text, f):
            bound = f"static_cast<long>({k.bound})" if k.bound is not None else "0L"
            if k.template:
                # the instantiations the sources launch
                launched = re.findall(rf"INSID3_LAUNCH\(\s*({k.name}\s*<[^,]*?>)\s*,", "\n".join(texts.values()))
                names = sorted(set(re.sub(r"\s+", "", n) for n in launched))
            else:
                names = [k.name]
            for n in names:
                lines.append(f'  ::cuda_emu::register_kernel(reinterpret_cast<const void*>(&{n}), "{n}", {bound});')
    using = "".join(f"using namespace {ns};\n" for ns in namespaces)
    return ("\n// ---- generated by tests/cuda_emu/build.py (kernel_scan.py): the kernels and their "
            "__launch_bounds__\nnamespace {\n" + using +
            "[[maybe_unused]] const bool cuda_emu_kernels_registered = [] {\n" + "\n".join(lines) +
            "\n  return true;\n}();\n}  // namespace\n")
