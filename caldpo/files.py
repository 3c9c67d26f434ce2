"""Files written whole or not at all: the one owner of how caldpo writes the files it hands over.

Every output a user keeps (``samples.json``, ``samples/step_<N>.json``, ``caldpo.eval``'s report,
``config.yaml`` / ``identity.json``, ``DONE``, checkpoint manifests, a repaired ``metrics.jsonl``,
preprocessed data folders) goes through here:

- :func:`write_atomic`: the bytes go to a temporary file in the destination's folder, are flushed
  to disk, and the file is renamed over the destination (then the folder's entry is flushed). A
  kill or a full disk at any point leaves the previous file, or none, never a part of one.
- :func:`write_output`: ``write_atomic`` for an entry point: a failure is an :class:`OutputError`
  (exit status 3) naming the file, the error, the free space and that the previous file is intact.
- :func:`check_writable`: before the work that produces an output (generation, judging), whether
  its folder exists or can be made and takes a new file: :class:`OutputError` (exit status 2) if not,
  so nothing is computed (or paid for) that could not be written.
- :func:`swap_dir`: replace a folder by a freshly written one; a complete copy exists at every instant
  (between its two renames the old one, at ``<dest>.old``).
- :func:`prepare_jsonl`: make an append-only JSON-lines file (``metrics.jsonl``, the verdict cache)
  safe to append to: a torn last line (a kill or a full disk mid-write) is cut.

Standard library only: the evaluation and preprocessing entry points use it without torch.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("caldpo")


class OutputError(RuntimeError):
    """An output that cannot be written: one ``caldpo: ...`` line naming the file, the error and the free
    space (``caldpo.cli``). ``exit_code``: 2 when found before the work, 3 when the write itself failed."""

    def __init__(self, message: str, exit_code: int = 3):
        super().__init__(message)
        self.exit_code = exit_code


def free_space(folder: Path) -> str:
    """``"<N> MiB free on <folder>"`` (of the nearest existing ancestor), or that it is unknown."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{shutil.disk_usage(p).free / 2**20:.0f} MiB free on {p}"
    except OSError:
        return f"free space on {p} unknown"


def os_reason(e: OSError) -> str:
    """``[Errno 28] No space left on device`` (the errno text without the file name), or the message."""
    return f"[Errno {e.errno}] {os.strerror(e.errno)}" if e.errno else (str(e) or type(e).__name__)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename itself is atomic
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path | str, data: bytes | str) -> None:
    """Write ``data`` (str: UTF-8) to ``path`` whole or not at all: a temporary file in the same folder,
    fsync, rename over ``path``, fsync of the folder. Raises the OSError (the temporary file removed;
    ``path`` as it was)."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def json_text(obj: Any, **dump_kw) -> str:
    """``obj`` as the JSON text caldpo writes (``dump_kw`` passed to ``json.dumps``), newline-terminated."""
    return json.dumps(obj, **dump_kw) + "\n"


def write_output(path: Path | str, data: bytes | str, what: str = "") -> Path:
    """:func:`write_atomic` for an output an entry point hands over; the folder is created. Returns ``path``.

    Raises OutputError (exit status 3): ``writing <what> <path> failed: <errno text> (<free space>); the
    previous <name> is unchanged ...``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
    except OSError as e:
        before = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
        why = {errno.ENOSPC: " (the disk is full)", errno.EDQUOT: " (the disk quota is used up)",
               errno.EFBIG: " (over the file-size limit, ulimit -f)"}.get(e.errno, "")
        raise OutputError(f"writing {what + ' ' if what else ''}{path} failed: {os_reason(e)}{why} "
                          f"({free_space(path.parent)}); {before}. Free space (or choose another path) "
                          "and run again", exit_code=3) from None
    return path


def check_writable(path: Path | str, option: str = "") -> Path:
    """Before the work: the folder of the file ``path`` exists (or is created) and a new file can be created
    in it (one is, and removed). Raises OutputError (exit status 2) naming the path, the error, the free
    space and ``option`` (the option or argument that chose the path) to change. Returns ``path``."""
    path = Path(path)
    where = f"{option}={path}" if option else str(path)
    if path.is_dir():
        raise OutputError(f"{where}: is a directory; name a file", exit_code=2)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write {where}: {os_reason(e)} ({free_space(path.parent)}); nothing was "
                          f"done. Choose a writable location{' with ' + option + '=' if option else ''}",
                          exit_code=2) from None
    return path


def swap_dir(new: Path, dest: Path) -> None:
    """Replace the folder ``dest`` by ``new`` (a sibling) so that a complete copy exists at every instant:
    ``dest`` is renamed ``<dest>.old``, ``new`` moved in, the old copy removed. Between the two renames
    ``dest`` does not exist and the complete copy is ``<dest>.old`` (a crash there leaves it for the
    user to move back). Raises OSError."""
    aside = dest.with_name(dest.name + ".old")
    if dest.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(dest, aside)
    os.replace(new, dest)
    _fsync_dir(dest.parent)
    shutil.rmtree(aside, ignore_errors=True)


def prepare_jsonl(path: Path, keep: int | None = None) -> int:
    """Make ``path`` a clean JSON-lines file to append to; returns its number of records.

    A half-written last line (a crash or a full disk mid-write) is cut back to the last newline,
    with a warning; with ``keep``, only the first ``keep`` lines stay (the rest are records written
    after the checkpoint a run resumes from, which it writes again). Rewrites are atomic
    (:func:`write_atomic`). Raises OSError when the file cannot be read or rewritten.
    """
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        log.warning("%s: dropping a half-written last line (%d bytes: %r...)", path, len(data) - cut,
                    data[cut:cut + 60])
    lines = data[:cut].splitlines(keepends=True)
    if keep is not None and keep < len(lines):
        log.info("%s: dropping %d records written after the resumed checkpoint", path, len(lines) - keep)
        lines = lines[:keep]
    out = b"".join(lines)
    if out != data:
        write_atomic(path, out)
    return len(lines)
