"""A folder on a real, small tmpfs, for the tests of writes that run out of room.

``full_disk`` is a fixture: ``full_disk(path, size="64k", fill=True)`` mounts a tmpfs of ``size`` on the
folder ``path`` (created if needed) until the test ends; ``fill`` writes a filler file until the
filesystem answers ENOSPC, so the next write of any size fails there, in this process and in any
subprocess, while creating an empty file (a probe) still succeeds. Mounting needs root with
CAP_SYS_ADMIN (CI containers, this project's machines); elsewhere the test skips, saying so.
``mount_tmpfs`` is the mount alone, for fixtures that emulate the full disk where it fails.
"""
from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest


def mount_tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` on ``path`` (created); False where this process may not mount."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):  # no mount command
        return False


def unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, timeout=30)


@pytest.fixture(name="full_disk")
def full_disk_fixture():
    mounted: list[Path] = []

    def make(path: Path, size: str = "64k", fill: bool = True) -> Path:
        path = Path(path)
        if not mount_tmpfs(path, size):
            pytest.skip("a full disk needs a tmpfs mount (root with CAP_SYS_ADMIN), not allowed here")
        mounted.append(path)
        if fill:
            with open(path / ".filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
        return path

    yield make
    for p in reversed(mounted):
        unmount(p)
