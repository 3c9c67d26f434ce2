"""caldpo.files: outputs written whole or not at all, destinations checked before the work, JSON-lines repair.

A full disk is emulated by a write that raises ENOSPC after part of the bytes went out; a read-only
folder is a real read-only mount where the tests may mount (tests/_readonly.py).
"""
from __future__ import annotations

import errno
import os

import pytest

from _readonly import read_only_fixture  # noqa: F401 (the read_only fixture)
from caldpo.files import OutputError, check_writable, prepare_jsonl, swap_dir, write_output


class _FullDisk:
    """``os.fdopen`` whose files take ``room`` bytes, then raise ENOSPC (the part written stays on disk)."""

    def __init__(self, monkeypatch, room: int):
        import caldpo.files as files
        real = os.fdopen

        def fdopen(fd, *a, **k):
            f = real(fd, *a, **k)
            write = f.write

            def limited(b):
                write(b[:room])
                f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.write = limited
            return f
        monkeypatch.setattr(files.os, "fdopen", fdopen)


def test_a_failed_write_keeps_the_previous_file_and_names_path_error_and_free_space(tmp_path, monkeypatch):
    out = tmp_path / "samples.json"
    out.write_text('["previous"]\n')
    _FullDisk(monkeypatch, room=5)
    with pytest.raises(OutputError) as e:
        write_output(out, '["new", "and longer"]\n', "samples")
    msg = str(e.value)
    assert e.value.exit_code == 3 and str(out) in msg and "No space left on device" in msg
    assert "MiB free on" in msg and "previous samples.json is unchanged" in msg and "\n" not in msg
    assert out.read_text() == '["previous"]\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.json"], "a temporary file was left behind"


def test_a_write_replaces_the_file_whole(tmp_path):
    out = tmp_path / "sub" / "report.json"
    assert write_output(out, "{}\n") == out and out.read_text() == "{}\n"
    write_output(out, b'{"a": 1}\n')
    assert out.read_text() == '{"a": 1}\n' and [p.name for p in out.parent.iterdir()] == ["report.json"]


def test_a_read_only_destination_is_refused_before_the_work(tmp_path, read_only):
    ro = read_only(tmp_path / "ro")
    with pytest.raises(OutputError) as e:
        check_writable(ro / "samples.json", "generate.output")
    msg = str(e.value)
    assert e.value.exit_code == 2 and f"generate.output={ro / 'samples.json'}" in msg
    assert "Read-only file system" in msg and "MiB free" in msg
    with pytest.raises(OutputError, match="Read-only file system"):
        check_writable(ro / "new_folder" / "x.json")
    with pytest.raises(OutputError, match="is a directory"):
        check_writable(tmp_path)
    assert check_writable(tmp_path / "a" / "b.json") == tmp_path / "a" / "b.json"
    assert list((tmp_path / "a").iterdir()) == []  # the probe file is gone


def test_swap_dir_replaces_a_folder_whole(tmp_path):
    dest, new = tmp_path / "out", tmp_path / "out.new"
    dest.mkdir()
    (dest / "test.jsonl").write_text("old\n")
    new.mkdir()
    (new / "train.jsonl").write_text("new\n")
    swap_dir(new, dest)
    assert [p.name for p in dest.iterdir()] == ["train.jsonl"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_jsonl_repair_cuts_a_torn_last_line(tmp_path):
    f = tmp_path / "cache.jsonl"
    f.write_text('{"k": 1}\n{"k": 2}\n{"k": 3, "ra')
    assert prepare_jsonl(f) == 2 and f.read_text() == '{"k": 1}\n{"k": 2}\n'
    assert prepare_jsonl(f, keep=1) == 1 and f.read_text() == '{"k": 1}\n'
    assert prepare_jsonl(tmp_path / "none.jsonl") == 0
