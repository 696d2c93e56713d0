"""Atomic file writes: the one helper every output of insid3_fast goes through.

A file is written to a temporary file next to it, flushed to disk, then renamed over the
destination (``os.replace``), so readers see the old file or the new one, never a half-written
one, and a failed write leaves what was there before untouched.

- Destinations are checked first (`check_output_path`): the folder must exist, and a path
  that is an input of the same command, a directory, a symbolic link, a FIFO, a device or a
  socket is refused (renaming over a link would replace the link, not write through it).
- A new file gets the mode a plain ``open(path, "w")`` would give (``0o666`` less the umask);
  a file that is replaced keeps its mode.
- Temporary files are named ``.<name>.<host>-<pid>-<random>.insid3-tmp``. One left behind by a
  killed process (SIGKILL, power loss) is removed by the next write into the same folder once
  its process is gone (same host) or it is a day old (another host, e.g. a shared disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import threading
import time
from typing import Any, BinaryIO, Callable, Iterable, Sequence

from .errors import InputError

__all__ = [
    "TEMP_SUFFIX",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_many",
    "atomic_write_text",
    "check_output_path",
    "make_output_folder",
    "remove_stale_temporaries",
]

TEMP_SUFFIX = ".insid3-tmp"
#: A temporary of another host (or of an unparsable name) older than this is stale.
STALE_AFTER_S = 24 * 3600.0

_TEMP_RE = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]+" + re.escape(TEMP_SUFFIX) + "$")
_cleaned: set[str] = set()
_cleaned_lock = threading.Lock()

Writer = Callable[[BinaryIO], None]


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _kind(mode: int) -> str | None:
    """What a non-regular file is, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_output_path(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = (),
                      what: str = "output", *, probe: bool = False) -> str:
    """Check that ``path`` can be written atomically without losing data; return it as ``str``.

    Raises InputError when the path is empty, when its folder does not exist, when it names one
    of ``inputs`` (the files the command reads), or when something other than a regular file is
    there; with ``probe``, also when a file cannot be created in its folder (read-only, /proc,
    no permission): a command checks that before its work, not after.
    """
    path = os.fspath(path)
    if not path:
        raise InputError(f"the {what} path is empty: give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{what} folder does not exist: '{folder}'")
    for source in inputs:
        source = os.fspath(source)
        if os.path.abspath(source) == os.path.abspath(path) or (os.path.lexists(path) and _same_file(source, path)):
            raise InputError(f"{what} '{path}' is also an input of this command ('{source}'); "
                             "writing it would destroy that input: choose another output path")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    kind = None if mode is None else _kind(mode)
    if kind is not None:
        hint = " (pass the path it points to, if that is what you mean)" if stat.S_ISLNK(mode) else ""
        raise InputError(f"{what} '{path}' is {kind}, not a regular file; insid3-fast writes a new file by "
                         f"renaming over the old one and would replace it{hint}: choose another output path")
    if probe:
        _probe(path, what)
    return path


def _probe(path: str, what: str) -> None:
    """Create and remove the temporary a write of ``path`` would create, or raise InputError
    (the folder is read-only, or the temporary's longer name is too long for it)."""
    try:
        tmp, fd = _temporary_for(path)
    except OSError as exc:
        folder = os.path.dirname(os.path.abspath(path))
        raise InputError(f"cannot write '{os.path.basename(path)}' in the {what} folder '{folder}': "
                         f"{exc.strerror or exc}") from None
    os.close(fd)
    _unlink_quietly(tmp)


def make_output_folder(folder: str | os.PathLike[str], what: str = "output",
                       names: Iterable[str] = ("write-check",)) -> str:
    """Create ``folder`` (and its parents) if needed and check that files can be written in it:
    the longest of ``names`` (the files the command will write there; none: no write check).

    Raises InputError naming the folder when it is empty, is a file, cannot be created or
    cannot be written in.
    """
    folder = os.fspath(folder)
    if not folder:
        raise InputError(f"the {what} folder is empty: give a folder name")
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise InputError(f"the {what} folder '{folder}' exists and is not a folder: choose another path")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the {what} folder '{folder}': {exc.strerror or exc}") from None
    longest = max(names, key=len, default=None)
    if longest is not None:
        _probe(os.path.join(folder, longest), what)
    return folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str], now: float | None = None) -> list[str]:
    """Delete the temporary files of our naming in ``folder`` that no live writer owns.

    A temporary is stale when its process (on this host) is gone, or when it is older than
    STALE_AFTER_S. Returns the paths removed; files that cannot be removed are left.
    """
    folder = os.fspath(folder)
    now = time.time() if now is None else now
    host, removed = _host_tag(), []
    try:
        names = [n for n in os.listdir(folder) if n.endswith(TEMP_SUFFIX)]
    except OSError:
        return removed
    for name in names:
        full = os.path.join(folder, name)
        try:
            st = os.lstat(full)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        match = _TEMP_RE.match(name)
        mine = match is not None and match["host"] == host
        stale = (mine and int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"]))) \
            or now - st.st_mtime > STALE_AFTER_S
        if stale:
            try:
                os.unlink(full)
                removed.append(full)
            except OSError:
                pass
    return removed


def _clean_once(folder: str) -> None:
    with _cleaned_lock:
        if folder in _cleaned:
            return
        _cleaned.add(folder)
    remove_stale_temporaries(folder)


def _temporary_for(path: str) -> tuple[str, int]:
    folder, name = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f".{name}.{_host_tag()}-{os.getpid()}-{os.urandom(6).hex()}{TEMP_SUFFIX}")
        try:
            # 0o666 less the umask, as open(path, "w") would give.
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_many(outputs: Sequence[tuple[str | os.PathLike[str], Writer]],
                      inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Write several files all-or-nothing: each ``write(fp)`` fills a binary file object.

    Every destination is checked (`check_output_path`) and every temporary written before
    the first rename, so an error in any writer leaves every destination as it was.
    """
    inputs = [os.fspath(p) for p in inputs]
    paths = [check_output_path(path, inputs) for path, _ in outputs]
    for i, a in enumerate(paths):
        for b in paths[:i]:
            if os.path.abspath(a) == os.path.abspath(b) or (os.path.lexists(a) and _same_file(a, b)):
                raise InputError(f"two outputs name the same file '{a}': give each output its own path")
    pending: list[tuple[str, str]] = []
    try:
        for path, (_, write) in zip(paths, outputs):
            _clean_once(os.path.dirname(os.path.abspath(path)))
            tmp, fd = _temporary_for(path)
            pending.append((tmp, path))
            with os.fdopen(fd, "wb") as fp:
                write(fp)
                fp.flush()
                os.fsync(fp.fileno())
            try:
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # a replaced file keeps its mode
            except FileNotFoundError:
                pass
        while pending:
            tmp, path = pending[0]
            os.replace(tmp, path)
            pending.pop(0)
    finally:
        for tmp, _ in pending:
            _unlink_quietly(tmp)


def atomic_write(path: str | os.PathLike[str], write: Writer, inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Write ``path`` atomically through ``write(fp)`` (a binary file object); see the module."""
    atomic_write_many([(path, write)], inputs)


def atomic_write_text(path: str | os.PathLike[str], text: str, inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    atomic_write(path, lambda fp: fp.write(data), inputs)


def atomic_write_json(path: str | os.PathLike[str], data: Any, inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Write ``data`` as pretty-printed JSON (with a final newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n", inputs)
