"""Reads the kernels of a CUDA translation unit and their ``__launch_bounds__`` from its sources.

The emulation compiles the sources unchanged, where ``__launch_bounds__(...)`` expands to
nothing (a C++ compiler has no place for it), so ``build.py`` appends to each translation unit
the code this module writes: every ``__global__`` function of the file and of the csrc headers
it includes, registered with ``cuda_emu::register_kernel`` under its address with the maximum
block size its bound declares (0 where none). The runtime then refuses launches a GPU would
refuse (see ``register_kernel`` in cuda_emu.h).

It reads declarations, not C++: comments and ``#if 0`` blocks are skipped, string literals are
kept whole, and ``__launch_bounds__`` may stand anywhere before the kernel's name. What it
cannot register (a bound that depends on the kernel's template parameters, a kernel defined by
a macro) is an error here or, for a kernel it never saw, at the kernel's first launch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# One pass over the text: string and character literals are kept, comments become a space.
_LEXEMES = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|//[^\n]*|/\*.*?\*/', re.S)
_INCLUDE = re.compile(r'#\s*include\s+"([^"]+)"')
_GLOBAL = re.compile(r"\b__global__\b")
_WORD = re.compile(r"[A-Za-z_]\w*")


@dataclass(frozen=True)
class Kernel:
    """One ``__global__`` function: its name, the first argument of its ``__launch_bounds__``
    (a C++ expression; None without one) and whether it is a template."""

    name: str
    bound: str | None
    template: bool


def _clean(text: str) -> str:
    """``text`` without comments and ``#if 0`` blocks (string literals kept)."""
    text = _LEXEMES.sub(lambda m: m.group(0) if m.group(0)[0] in "\"'" else " ", text)
    out, depth = [], 0  # depth > 0: inside an #if 0 (nested conditionals counted)
    for line in text.split("\n"):
        directive = line.strip()
        if depth:
            if re.match(r"#\s*if", directive):
                depth += 1
            elif re.match(r"#\s*endif\b", directive):
                depth -= 1
            elif depth == 1 and re.match(r"#\s*(else|elif)\b", directive):
                depth = 0
            out.append("")
        elif re.match(r"#\s*if\s+0\b", directive):
            depth = 1
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def _without_directives(text: str) -> str:
    """``text`` with every preprocessor line (continuations included) blanked: a macro's body
    is not a declaration (kernels a macro defines are not read; a launch of one is refused)."""
    out, continued = [], False
    for line in text.split("\n"):
        directive = continued or line.lstrip().startswith("#")
        continued = directive and line.rstrip().endswith("\\")
        out.append("" if directive else line)
    return "\n".join(out)


def _group_end(text: str, start: int, open_: str, close: str) -> int:
    """The index just past the balanced ``open_ ... close`` group that opens at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_}{close}")


def _arguments(args: str) -> list[str]:
    """The top-level comma-separated arguments of ``args`` (commas inside parentheses, brackets
    or braces do not split; angle brackets do not count: they are also comparisons)."""
    out, depth, begin = [], 0, 0
    for i, ch in enumerate(args):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(args[begin:i].strip())
            begin = i + 1
    out.append(args[begin:].strip())
    return out


def _template_parameters(head: str) -> set[str] | None:
    """The parameter names of a ``template <...>`` at the start of ``head``; None if there is none."""
    m = re.match(r"\s*template\s*<", head)
    if m is None:
        return None
    params = head[m.end():_group_end(head, m.end() - 1, "<", ">") - 1]
    names = set()
    for p in _arguments(params):
        words = _WORD.findall(p.split("=")[0])
        if words:
            names.add(words[-1])
    return names


def kernels_of(text: str, where: str = "<source>") -> list[Kernel]:
    """The kernels declared in ``text``, in order."""
    text = _without_directives(_clean(text))
    out = []
    for m in _GLOBAL.finditer(text):
        begin = max(text.rfind(";", 0, m.start()), text.rfind("}", 0, m.start()), text.rfind("{", 0, m.start())) + 1
        params = _template_parameters(text[begin:m.start()])
        pos, bound = begin, None
        if params is not None:  # past the template head
            pos = _group_end(text, text.index("<", begin), "<", ">")
        while True:
            w = _WORD.search(text, pos)
            if w is None:
                raise ValueError(f"{where}: cannot read the __global__ function at offset {m.start()}")
            after = re.match(r"\s*\(", text[w.end():])
            if w.group(0) == "__launch_bounds__" and after is not None:
                open_at = w.end() + after.end() - 1
                close = _group_end(text, open_at, "(", ")")
                bound = _arguments(text[open_at + 1:close - 1])[0]
                pos = close
            elif after is not None:
                name = w.group(0)
                break
            else:
                pos = w.end()
        if bound is not None and params and params & set(_WORD.findall(bound)):
            raise ValueError(f"{where}: the __launch_bounds__({bound}) of kernel {name} depends on its template "
                             "parameters, which the emulation's scan cannot evaluate: use a constant")
        out.append(Kernel(name, bound, params is not None))
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
            text = _clean(f.read())
        for inc in _INCLUDE.findall(text):
            for base in (os.path.dirname(p), csrc, *search):
                cand = os.path.join(base, inc)
                if os.path.exists(cand):
                    visit(cand)
                    break

    visit(path)
    return seen


def named_namespaces(text: str) -> list[str]:
    """Every named namespace ``text`` opens, fully qualified (``a`` and ``a::b`` for a ``b`` in an
    ``a``, or for ``namespace a::b``), parents first; unnamed ones are transparent."""
    names: list[str] = []
    stack: list[str | None] = []  # per open brace: the namespace it opened (None: another brace)
    opener = re.compile(r"\bnamespace\s+([A-Za-z_]\w*(?:\s*::\s*[A-Za-z_]\w*)*)?\s*\{|[{}]")
    for m in opener.finditer(text):
        token = m.group(0)
        if token == "}":
            if stack:
                stack.pop()
        elif token == "{":
            stack.append(None)
        else:
            outer = next((ns for ns in reversed(stack) if ns is not None), "")
            qualified = outer
            for part in (m.group(1) or "").split("::"):
                if part.strip():
                    qualified = f"{qualified}::{part.strip()}" if qualified else part.strip()
                    if qualified not in names:
                        names.append(qualified)
            stack.append(qualified or outer or None)
    return names


def _instantiations(name: str, text: str) -> list[str]:
    """The template arguments ``name<...>`` is launched with in ``text`` (INSID3_LAUNCH sites)."""
    found = []
    for m in re.finditer(rf"INSID3_LAUNCH\(\s*{name}\s*(?=<)", text):
        end = _group_end(text, m.end(), "<", ">")
        found.append(name + re.sub(r"\s+", " ", text[m.end():end]))
    return found


def registration_code(path: str, csrc: str, search: tuple[str, ...] = ()) -> str:
    """C++ to append to the translation unit of ``path``: every kernel registered with its bound."""
    files = translation_unit(path, csrc, search)
    texts = {f: _clean(open(f).read()) for f in files}
    everything = "\n".join(texts.values())
    namespaces: list[str] = []
    for t in texts.values():
        namespaces += [ns for ns in named_namespaces(t) if ns not in namespaces]
    lines = []
    for f, text in texts.items():
        for k in kernels_of(text, f):
            bound = f"static_cast<long>({k.bound})" if k.bound is not None else "0L"
            names = sorted(set(_instantiations(k.name, everything))) if k.template else [k.name]
            for n in names:
                lines.append(f'  ::cuda_emu::register_kernel(reinterpret_cast<const void*>(&{n}), "{n}", {bound});')
    using = "".join(f"using namespace {ns};\n" for ns in namespaces)
    return ("\n// ---- generated by tests/cuda_emu/build.py (kernel_scan.py): the kernels and their "
            "__launch_bounds__\nnamespace {\n" + using +
            "[[maybe_unused]] const bool cuda_emu_kernels_registered = [] {\n" + "\n".join(lines) +
            "\n  return true;\n}();\n}  // namespace\n")
