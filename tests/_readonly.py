"""A folder on a read-only filesystem, for the tests of unwritable outputs and run directories.

``read_only`` is a fixture: ``read_only(path)`` makes the folder ``path`` (created if needed, with what
it holds) read-only until the test ends. Where this process may mount (root with CAP_SYS_ADMIN: CI
containers, this project's machines) it is a real read-only bind mount, so every write into it fails
with EROFS in this process and in any subprocess; elsewhere the folder is read-only for this process
only: ``os.open``/``os.mkdir``/``open`` for writing under it raise EROFS (root ignores chmod, so a
mode bit cannot stand in for either). ``read_only.real`` says which one the test got.
"""
from __future__ import annotations

import builtins
import errno
import os
import subprocess
from pathlib import Path

import pytest


def _mount_ro(path: Path) -> bool:
    try:
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        return False
    return True


@pytest.fixture(name="read_only")
def read_only_fixture(monkeypatch):
    mounted: list[Path] = []

    def make(path: Path) -> Path:
        path = Path(path).resolve()
        path.mkdir(parents=True, exist_ok=True)
        if _mount_ro(path):
            mounted.append(path)
            make.real = True
            return path
        make.real = False
        inside = (lambda p: str(Path(os.fsdecode(p)).resolve()).startswith(str(path))
                  if isinstance(p, (str, bytes, os.PathLike)) else False)
        erofs = (lambda p: OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(p)))
        real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

        def fake_open(file, mode="r", *a, **k):
            if inside(file) and any(c in mode for c in "wax+"):
                raise erofs(file)
            return real_open(file, mode, *a, **k)

        def fake_os_open(file, flags, *a, **k):
            if inside(file) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise erofs(file)
            return real_os_open(file, flags, *a, **k)

        def fake_mkdir(file, *a, **k):
            if inside(file):
                if os.path.lexists(file):  # as the kernel does: an existing name is EEXIST, not EROFS
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(file))
                raise erofs(file)
            return real_mkdir(file, *a, **k)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        return path

    make.real = False
    yield make
    for p in mounted:
        subprocess.run(["umount", str(p)], capture_output=True, timeout=30)
