"""metrics.jsonl that cannot be written (full disk, unwritable path) stops the run with one RunError
(exit status 3) naming the file, the errno text, the free space and what is kept."""
from __future__ import annotations

import collections
import errno
import json
import shutil

import pytest

from caldpo.train.config import load_config
from caldpo.train.metrics import MetricsWriter
from caldpo.train.rundir import RunError
from conftest import TINY


class FullDisk:
    """A file whose writes fail as on a full disk (what was written before stays)."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


def test_full_disk_names_file_errno_free_space_and_the_kept_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "checkpoints" / "step_4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_4" / "MANIFEST.json").write_text("{}")
    writer = MetricsWriter(tmp_path, load_config(TINY), enabled=True)
    writer.write({"step": 1})
    writer.file = FullDisk(writer.file)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: collections.namedtuple("usage", "total used free")(100 << 20, 99 << 20, 1 << 20))
    with pytest.raises(RunError) as e:
        writer.write({"step": 2})
    msg = str(e.value)
    assert e.value.exit_code == 3
    assert f"writing {tmp_path / 'metrics.jsonl'} failed: [Errno {errno.ENOSPC}] No space left on device" in msg
    assert f"1 MiB free on {tmp_path}" in msg
    assert f"the last resume checkpoint {tmp_path / 'checkpoints' / 'step_4'} is kept" in msg
    writer.write({"step": 3})  # the writer is closed: nothing more is attempted
    writer.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [{"step": 1}]


def test_unwritable_metrics_file_is_a_run_error(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()  # a directory in the file's place: cannot be opened, even by root
    with pytest.raises(RunError) as e:
        MetricsWriter(tmp_path, load_config(TINY), enabled=True)
    assert e.value.exit_code == 3 and str(tmp_path / "metrics.jsonl") in str(e.value)
    assert "Is a directory" in str(e.value) and "no resume checkpoint was saved yet" in str(e.value)
