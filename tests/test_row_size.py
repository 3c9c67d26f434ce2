"""A data row larger than ``data.max_row_bytes`` stops the load naming its file:line, its size and the
limit, before it is decoded (or, with ``data.on_error=skip``, is skipped and counted as row_too_large)."""
from __future__ import annotations

import json
import tracemalloc

import pytest

from _data_fixtures import hh, write_jsonl
from caldpo.train.config import ConfigError, load_config, validate
from caldpo.train.data import DataError, iter_file, load_dataset
from caldpo.train.schedule import Examples

def _h(i: int) -> str:
    return f"\n\nHuman: question {i}\n\nAssistant:"


H = _h(0)


def _rows(big_reply: str) -> list[dict]:
    return [hh(_h(1), " one", " two"), hh(_h(2), big_reply, " short"), hh(_h(3), " three", " four")]


def test_jsonl_row_over_the_limit_names_file_line_size_and_limit(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", _rows(" " + "a" * 5000))
    size = len(f.read_bytes().splitlines()[1])
    with pytest.raises(DataError) as e:
        load_dataset("hh", "train", path=str(f), max_row_bytes=1000)
    msg = str(e.value)
    assert msg.startswith(f"data.paths.hh: {f}:2: row of {size:,} bytes is larger than data.max_row_bytes=1,000")
    assert "data.on_error=skip" in msg and e.value.reason == "row_too_large"
    groups, report = load_dataset("hh", "train", path=str(f), max_row_bytes=1000, on_error="skip")
    assert report.skipped == {"row_too_large": 1} and report.rows_read == 3 and len(groups) == 2
    groups, report = load_dataset("hh", "train", path=str(f), max_row_bytes=size)  # at the limit: kept
    assert report.skipped == {} and len(groups) == 3


def test_a_huge_line_is_never_held_whole(tmp_path):
    """A 24 MB line under a 64 KiB limit: read in bounded pieces, the rows after it still read."""
    f = tmp_path / "train.jsonl"
    with open(f, "w") as out:
        out.write(json.dumps(hh(H, " one", " two")) + "\n")
        big = '{"chosen": "' + "b" * (24 << 20) + '"}'
        out.write(big + "\n")
        out.write(json.dumps(hh(_h(3), " three", " four")) + "\n")
    tracemalloc.start()
    try:
        records = list(iter_file(f, max_row_bytes=64 << 10))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB"
    assert [r.line for r in records] == [1, 2, 3] and records[1].row.reason == "row_too_large"
    assert f"row of {len(big):,} bytes" in records[1].row.what  # its size, newline excluded
    assert isinstance(records[0].row, dict) and isinstance(records[2].row, dict)


def test_json_array_item_and_parquet_row_over_the_limit(tmp_path):
    rows = _rows(" " + "c" * 3000)
    array_file = tmp_path / "arr" / "train.json"
    array_file.parent.mkdir()
    array_file.write_text(json.dumps(rows, indent=1))
    with pytest.raises(DataError, match=r"train\.json item 2: row of [\d,]+ bytes is larger than data\.max_row_bytes=2,000"):
        load_dataset("hh", "train", path=str(array_file.parent), max_row_bytes=2000)
    groups, report = load_dataset("hh", "train", path=str(array_file.parent), max_row_bytes=2000, on_error="skip")
    assert report.skipped == {"row_too_large": 1} and len(groups) == 2
    assert load_dataset("hh", "train", path=str(array_file.parent))[1].pairs == 3  # default limit: all kept

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), pq_dir / "train-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"parquet row 2: row of [\d,]+ bytes is larger than data\.max_row_bytes=2,000"):
        load_dataset("hh", "train", path=str(pq_dir), max_row_bytes=2000)


def test_the_limit_is_a_config_value(tmp_path):
    d = tmp_path / "hh"
    write_jsonl(d / "train.jsonl", _rows(" " + "d" * 5000))
    write_jsonl(d / "test.jsonl", _rows(" short"))
    over = ["datasets=[hh]", f"data.paths.hh={d}", f"data.token_cache_dir={tmp_path / 'c'}"]
    assert load_config(over).data.max_row_bytes == 4 << 20  # the default: 4 MiB
    with pytest.raises(DataError, match=rf"^data\.paths\.hh: {d / 'train.jsonl'}:2: row of [\d,]+ bytes"):
        Examples(load_config([*over, "data.max_row_bytes=1000"]), "train", sft=False, verbose=False)
    data = Examples(load_config([*over, "data.max_row_bytes=1000", "data.on_error=skip"]), "train", sft=False,
                    verbose=False)
    assert data.reports[0].skipped == {"row_too_large": 1} and len(data) == 2
    with pytest.raises(ConfigError, match="data.max_row_bytes=0: must be a positive number of bytes"):
        validate(load_config([*over, "data.max_row_bytes=0"]), 1, training=False)
