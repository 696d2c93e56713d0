"""Per-episode records in JSONL (resume state) and the run configuration they belong to."""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable

from .. import distributed
from ..atomic import atomic_write_json
from ..errors import InputError

RECORD_GLOB = "episodes.rank*.jsonl"
CONFIG_FILE = "run_config.json"


def read_records(output_dir: str) -> dict[int, dict[str, Any]]:
    """Finished episodes of every rank's record file, by episode index.

    A line cut short by an interruption is skipped; its episode is simply run again.
    """
    done: dict[int, dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(output_dir, RECORD_GLOB))):
        with open(path) as fp:
            for line in fp:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "index" in rec:
                    done.setdefault(int(rec["index"]), rec)
    return done


class RecordWriter:
    """Appends one JSON line per finished episode and fsyncs it, so a crash loses at most one."""

    def __init__(self, output_dir: str, rank: int) -> None:
        self.path = os.path.join(output_dir, f"episodes.rank{rank}.jsonl")
        # Terminate a line left unfinished by an earlier interruption before appending.
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as fp:
                fp.seek(-1, os.SEEK_END)
                needs_newline = fp.read(1) != b"\n"
        else:
            needs_newline = False
        self._fp = open(self.path, "a")
        if needs_newline:
            self._fp.write("\n")

    def append(self, record: dict[str, Any]) -> None:
        """Write and fsync one record."""
        self._fp.write(json.dumps(record) + "\n")
        self._fp.flush()
        os.fsync(self._fp.fileno())

    def close(self) -> None:
        """Close the file."""
        self._fp.close()


def check_or_write_config(output_dir: str, fingerprint: dict[str, Any], write: bool) -> None:
    """Refuse to resume into an output directory produced with a different configuration."""
    path = os.path.join(output_dir, CONFIG_FILE)
    if os.path.exists(path):
        try:
            with open(path, "rb") as fp:
                previous = json.loads(fp.read().decode("utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read '{path}' ({exc}); pass --overwrite to start afresh") from None
        if not isinstance(previous, dict):
            raise InputError(f"'{path}' is not a run configuration; pass --overwrite to start afresh")
        if previous != json.loads(json.dumps(fingerprint)):
            changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
            raise InputError(
                f"'{output_dir}' holds a run with a different configuration (differs in: {', '.join(changed)}); "
                "use another --output-dir or pass --overwrite to start afresh"
            )
    elif write:
        atomic_write_json(path, fingerprint)


def claim_output_dir(output_dir: str, fingerprint: dict[str, Any], rank: int) -> None:
    """Rank 0 checks (or writes) the run's configuration in ``output_dir``; every rank raises
    the same InputError when it belongs to a different run."""
    error = None
    if rank == 0:
        try:
            check_or_write_config(output_dir, fingerprint, write=True)
        except InputError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)  # so that no rank goes on alone
    if error:
        raise InputError(error)


def clear_run(output_dir: str, names: Iterable[str] = ()) -> None:
    """Delete the records and config of a previous run (for --overwrite)."""
    for path in glob.glob(os.path.join(output_dir, RECORD_GLOB)):
        os.unlink(path)
    for name in (CONFIG_FILE, *names):
        p = os.path.join(output_dir, name)
        if os.path.exists(p):
            os.unlink(p)
