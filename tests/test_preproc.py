"""python -m caldpo.train.preproc: TL;DR exports -> training files the loader reads."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _data_fixtures import comparison, write_jsonl
from caldpo.train.data import DataError, load_dataset
from caldpo.train.preproc import main, tldr_pref, tldr_sft

ROOT = Path(__file__).resolve().parents[1]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tldr_pref_directory_of_batches(tmp_path, capsys):
    comp = tmp_path / "comparisons"
    write_jsonl(comp / "batch1.json", [comparison(split="train", texts=(" a", " b"), choice=1),
                                      comparison(split="valid1", subreddit="r/tifu", texts=("c", " d"))])
    write_jsonl(comp / "batch2_cnndm.json", [{"info": {"id": "n", "title": "T", "article": "A", "site": "cnn"},
                                             "split": "valid2", "summaries": [{"text": " x"}, {"text": " y"}], "choice": 0}])
    write_jsonl(comp / "batch3.json", [comparison(split="valid2", texts=(" same", "same "))])
    main(["tldr-pref", "--input", str(comp), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "data tldr-pref/train" in printed and "cnndm_dropped=1" in printed
    assert read(tmp_path / "out" / "train.jsonl") == [
        {"prompt": "SUBREDDIT: r/relationships\nTITLE: A title\nPOST: My post.\nTL;DR:", "chosen": " b", "rejected": " a"}]
    assert read(tmp_path / "out" / "test.jsonl") == [
        {"prompt": "SUBREDDIT: r/tifu\nTITLE: A title\nPOST: My post.\nTL;DR:", "chosen": " c", "rejected": " d"}]
    groups, report = load_dataset("tldr", "test", path=str(tmp_path / "out"))
    assert [(g.prompt, g.responses, g.pairs) for g in groups.values()] == [
        ("SUBREDDIT: r/tifu\nTITLE: A title\nPOST: My post.\nTL;DR:", [" c", " d"], [(0, 1)])]
    assert groups["SUBREDDIT: r/tifu\nTITLE: A title\nPOST: My post.\nTL;DR:"].truncation_mode == "keep_start"
    # the same rows read raw by the loader give the same groups
    raw, raw_report = load_dataset("tldr", "test", path=str(comp))
    assert raw == groups
    assert raw_report.anomalies == {"other_split": 1, "subreddit_has_r_prefix": 1, "summary_without_leading_space": 2,
                                    "cnndm_dropped": 1, "identical_pair_dropped": 1}


def test_tldr_pref_broken_row_names_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "batch9.json", [comparison(), comparison(split="valid3"), comparison(split="valid1")])
    with pytest.raises(DataError, match=r"batch9\.json:2: 'split' should be one of train, valid1, valid2, is 'valid3'"):
        tldr_pref([str(f)], str(tmp_path / "out"))
    reports = tldr_pref([str(f)], str(tmp_path / "out"), on_error="skip")
    assert reports["train"].skipped == {"bad_split": 1} and reports["train"].pairs == 1
    assert len(read(tmp_path / "out" / "train.jsonl")) == 1


def test_tldr_sft_files_by_split(tmp_path):
    src = tmp_path / "filtered"
    write_jsonl(src / "train.jsonl", [{"id": "1", "subreddit": "tifu", "title": "T", "post": "P", "summary": "S"}])
    write_jsonl(src / "test.jsonl", [{"id": "2", "subreddit": "r/AskReddit", "title": "Q", "post": "B", "summary": " A "}])
    reports = tldr_sft([str(src)], str(tmp_path / "out"))
    assert sorted(reports) == ["test", "train"]
    assert read(tmp_path / "out" / "train.jsonl") == [{"prompt": "SUBREDDIT: r/tifu\nTITLE: T\nPOST: P\nTL;DR:", "target": " S"}]
    groups, _ = load_dataset("tldr", "test", path=str(tmp_path / "out"), sft=True)
    (g,) = groups.values()
    assert (g.prompt, g.sft_target, g.responses, g.pairs) == ("SUBREDDIT: r/AskReddit\nTITLE: Q\nPOST: B\nTL;DR:", " A", [" A"], [])


def test_tldr_sft_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"subreddit": "tifu", "title": "T", "post": "P", "summary": "S"},
            {"subreddit": "tifu", "title": None, "post": "P", "summary": "S"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "valid-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"valid-00000-of-00001\.parquet row 2: missing field 'title'"):
        tldr_sft([str(tmp_path / "valid-00000-of-00001.parquet")], str(tmp_path / "out"))
    reports = tldr_sft([str(tmp_path / "valid-00000-of-00001.parquet")], str(tmp_path / "out"), on_error="skip")
    assert reports["valid"].skipped == {"missing_field": 1} and reports["valid"].prompts == 1


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "caldpo.train.preproc", "tldr-pref", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "--input" in out and "--out" in out and "--on-error" in out


def test_tldr_pref_refuses_an_empty_split(tmp_path, capsys):
    """Only validation rows: no empty train.jsonl, an error naming the input, exit status 2."""
    f = write_jsonl(tmp_path / "batch13.json", [comparison(split="valid2"), comparison(split="valid1", texts=(" p", " q"))])
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        tldr_pref([str(f)], str(out))
    assert str(e.value).startswith(f"--input: {f}: no train examples (test: 2 rows read")
    assert e.value.hint == "add the files holding the train rows; nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch13.json"]  # no out folder, no temporary left
    with pytest.raises(SystemExit) as exit_:
        main(["tldr-pref", "--input", str(f), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("caldpo: data error: --input: ")
    # rows all dropped by the rules are no better than no rows
    g = write_jsonl(tmp_path / "batch14.json", [comparison(split="train"), comparison(split="valid1", texts=(" s", "s"))])
    with pytest.raises(DataError, match=r"no test examples \(.*identical_pair_dropped=1"):
        tldr_pref([str(g)], str(out))


def test_tldr_sft_refuses_an_empty_split_and_broken_lines_exit_2(tmp_path, capsys):
    src = tmp_path / "filtered"
    write_jsonl(src / "train.jsonl", [{"subreddit": "s", "title": "T", "post": "P", "summary": "S"}])
    write_jsonl(src / "valid.jsonl", [b'{"subreddit": "s", "title": "T", "post": "P", "summary": '])
    with pytest.raises(SystemExit) as exit_:
        main(["tldr-sft", "--input", str(src), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"caldpo: data error: {src / 'valid.jsonl'}:1: bad JSON")
    assert err.rstrip().endswith("or pass --on-error skip to skip broken rows and count them")
    with pytest.raises(DataError, match=r"no valid examples .*rows skipped: bad_json=1"):
        tldr_sft([str(src)], str(tmp_path / "out"), on_error="skip")
    assert not (tmp_path / "out" / "train.jsonl").exists()


def _sft_rows(tag: str, n: int) -> list[dict]:
    return [{"subreddit": tag, "title": f"{tag} title {i}", "post": f"{tag} post {i}", "summary": f"{tag} summary {i}"}
            for i in range(n)]


def test_a_second_output_replaces_the_first_whole_and_lists_what_it_wrote(tmp_path, capsys):
    """An earlier output's test.jsonl must not sit beside a new input's train.jsonl (a run would evaluate on
    the old data); the last line lists the files written, only those."""
    old, new, out = tmp_path / "old", tmp_path / "new", tmp_path / "out"
    write_jsonl(old / "train.jsonl", _sft_rows("old", 3))
    write_jsonl(old / "test.jsonl", _sft_rows("old", 2))
    write_jsonl(new / "train.jsonl", _sft_rows("new", 4))
    main(["tldr-sft", "--input", str(old), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["test.jsonl", "train.jsonl"]
    capsys.readouterr()
    main(["tldr-sft", "--input", str(new), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"]
    assert all("new post" in r["prompt"] for r in read(out / "train.jsonl")) and len(read(out / "train.jsonl")) == 4
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {out / 'train.jsonl'}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old", "out"]  # no temporary folder left

    # a run that fails leaves the earlier output as it was
    write_jsonl(new / "test.jsonl", [b'{"broken'])
    with pytest.raises(DataError):
        tldr_sft([str(new)], str(out))
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"] and len(read(out / "train.jsonl")) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old", "out"]


def test_an_out_folder_holding_other_files_is_refused(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    write_jsonl(src / "train.jsonl", _sft_rows("a", 2))
    out.mkdir()
    (out / "NOTES.md").write_text("mine\n")
    with pytest.raises(SystemExit) as exit_:
        main(["tldr-sft", "--input", str(src), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and f"--out {out}: holds NOTES.md" in err
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md"]
