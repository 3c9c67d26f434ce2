"""Row parsing, grouping, anomaly counts and broken-row errors of caldpo.train.data."""
from __future__ import annotations

import gzip
import json

import pytest

from _data_fixtures import comparison, hh, write_jsonl
from caldpo.train.data import DATASETS, DataError, PromptGroup, load_dataset

H1 = "\n\nHuman: Hi there\n\nAssistant:"
H2 = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"


def test_dataset_names():
    assert DATASETS == ("hh", "tldr", "sample")
    with pytest.raises(ValueError, match="valid names: hh, tldr, sample"):
        load_dataset("imdb", "train", path="x")
    with pytest.raises(ValueError, match="valid splits"):
        load_dataset("hh", "valid", path="x")


def test_hh_prompt_is_chosen_up_to_last_assistant(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [hh(H2, " Fine, thanks.", " Go away.")])
    groups, report = load_dataset("hh", "test", path=str(f))
    assert list(groups) == [H2]
    g = groups[H2]
    assert g == PromptGroup(
        prompt="\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:",
        responses=[" Fine, thanks.", " Go away."], pairs=[(0, 1)], sft_target=" Fine, thanks.",
        truncation_mode="keep_end")
    assert (g.pair_sources, g.sft_source) == ([f"{f}:1"], f"{f}:1")
    assert (report.rows_read, report.prompts, report.pairs) == (1, 1, 1)
    assert report.anomalies == {} and report.skipped == {}


def test_hh_grouping_by_prompt(tmp_path):
    rows = [hh(H1, " A", " B"), hh(H2, " X", " Y"), hh(H1, " C", " A"), hh(H1, " A", " B")]
    groups, report = load_dataset("hh", "train", path=str(write_jsonl(tmp_path / "t.jsonl", rows)))
    assert list(groups) == [H1, H2]
    assert groups[H1].responses == [" A", " B", " C"]
    assert groups[H1].pairs == [(0, 1), (2, 0), (0, 1)]
    assert groups[H1].sft_target == " A"  # chosen of the prompt's first row
    assert (report.prompts, report.pairs) == (2, 4)
    assert report.anomalies == {"repeated_pair_kept": 1}


def test_provenance_of_pairs_and_sft_targets(tmp_path, fake_hub):
    """Each pair and SFT target names the row it came from: file:line, array item, hub split:row."""
    rows = [hh(H1, " A", " B"), b"", hh(H1, " S", " S"), hh(H2, " X", " Y"), hh(H1, " C", " A")]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    groups, _ = load_dataset("hh", "train", path=str(f))
    assert groups[H1].pair_sources == [f"{f}:1", f"{f}:5"] and groups[H1].sft_source == f"{f}:1"
    assert groups[H2].pair_sources == [f"{f}:4"]
    assert all(len(g.pair_sources) == len(g.pairs) for g in groups.values())
    only_same = write_jsonl(tmp_path / "s.jsonl", [hh(H2, " X", " Y"), hh(H1, " S", " S")])
    groups, _ = load_dataset("hh", "train", path=str(only_same), sft=True)
    assert groups[H1].sft_source == f"{only_same}:2" and groups[H1].pair_sources == []
    arr = tmp_path / "test.json"
    arr.write_text(json.dumps([comparison(split="valid1"), comparison(split="valid2", texts=(" c", " d"))]))
    (g,) = load_dataset("tldr", "test", path=str(arr))[0].values()
    assert g.pair_sources == [f"{arr} item 1", f"{arr} item 2"]
    fake_hub.rows = [hh(H2, " X", " Y"), hh(H1, " a", " b")]
    groups, _ = load_dataset("hh", "test")
    assert groups[H1].pair_sources == ["Anthropic/hh-rlhf/test:1"] and groups[H2].sft_source == "Anthropic/hh-rlhf/test:0"


def test_hh_prompt_not_shared_split_at_longest_shared_prefix(tmp_path):
    # chosen has two Assistant turns in a row; rejected only one (the real-data anomaly).
    chosen = "\n\nHuman: Q?\n\nAssistant: Let me see.\n\nAssistant: The answer."
    rejected = "\n\nHuman: Q?\n\nAssistant: No idea."
    groups, report = load_dataset("hh", "test", path=str(write_jsonl(tmp_path / "t.jsonl", [
        {"chosen": chosen, "rejected": rejected}])))
    (g,) = groups.values()
    assert g.prompt == "\n\nHuman: Q?\n\nAssistant:"
    assert g.responses == [" Let me see.\n\nAssistant: The answer.", " No idea."]
    assert report.anomalies == {"prompt_not_shared": 1}


def test_hh_empty_final_reply_kept_and_identical_dropped(tmp_path):
    rows = [hh(H1, " ", " Something."), hh(H1, " Same.", " Same."), hh(H2, " Sure.", " ")]
    groups, report = load_dataset("hh", "test", path=str(write_jsonl(tmp_path / "t.jsonl", rows)))
    assert groups[H1].responses == [" ", " Something."] and groups[H1].pairs == [(0, 1)]
    assert groups[H2].responses == [" Sure.", " "]
    assert report.anomalies == {"empty_final_reply": 2, "identical_pair_dropped": 1}
    assert report.pairs == 2
    # sft=True keeps the identical row's prompt as an SFT target.
    only_same = write_jsonl(tmp_path / "s.jsonl", [hh(H1, " Same.", " Same.")])
    with pytest.raises(DataError, match=r"no test examples \(1 rows read; rules applied: identical_pair_dropped=1"):
        load_dataset("hh", "test", path=str(only_same))
    groups, _ = load_dataset("hh", "test", path=str(only_same), sft=True)
    assert groups[H1].sft_target == " Same." and groups[H1].pairs == []


def test_hh_local_directory_of_gz_subsets(tmp_path):
    write_jsonl(tmp_path / "helpful-base" / "test.jsonl.gz", [hh(H1, " B1", " B2")], gz=True)
    write_jsonl(tmp_path / "harmless-base" / "test.jsonl.gz", [hh(H1, " A1", " A2")], gz=True)
    write_jsonl(tmp_path / "harmless-base" / "train.jsonl.gz", [hh(H2, " T1", " T2")], gz=True)
    groups, report = load_dataset("hh", "test", path=str(tmp_path))
    assert groups[H1].responses == [" A1", " A2", " B1", " B2"]  # subset order: harmless-base first
    assert groups[H1].pairs == [(0, 1), (2, 3)]
    assert report.rows_read == 2 and report.source == str(tmp_path)
    groups, _ = load_dataset("hh", "train", path=str(tmp_path))
    assert list(groups) == [H2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^data.paths.hh: .*/empty: no data files \(.jsonl, .jsonl.gz, .json"):
        load_dataset("hh", "test", path=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no such file or directory"):
        load_dataset("hh", "test", path=str(tmp_path / "nowhere"))


def test_sample_reads_hh_format(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [hh(H1, " a", " b")])
    groups, report = load_dataset("sample", "train", path=str(tmp_path))
    assert groups[H1].truncation_mode == "keep_end" and report.dataset == "sample"


@pytest.mark.parametrize("line, reason, message", [
    (b'{"chosen": "\\n\\nHuman: x\\n\\nAssistant: y", "rejected": ', "bad_json", "bad JSON (Expecting value at the end of the line)"),
    (b'{"chosen": "a" "rejected": "b"}', "bad_json", "bad JSON (Expecting ',' delimiter at character 16)"),
    (b'{"chosen": "\\n\\nHuman: x\\n\\nAssistant: y"}', "missing_field", "missing field 'rejected'"),
    (b'{"chosen": 3, "rejected": "r"}', "wrong_type", "field 'chosen' should be str, got int"),
    (b'["chosen", "rejected"]', "wrong_type", "expected a JSON object"),
    (b'{"chosen": "\\n\\nHuman: x y", "rejected": "\\n\\nHuman: x z"}', "no_assistant_turn", r"'chosen' has no '\n\nAssistant:' turn"),
    (b'{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: c\\n\\nAssistant: d"}',
     "no_assistant_turn", r"'chosen' and 'rejected' share no prefix ending in '\n\nAssistant:'"),
    (b'{"chosen": "\\n\\nHuman: \xff\xfe", "rejected": "r"}', "undecodable", "not UTF-8"),
])
def test_hh_broken_rows(tmp_path, line, reason, message):
    good = json.dumps(hh(H1, " a", " b")).encode()
    f = write_jsonl(tmp_path / "broken.jsonl", [good, b"", good, line, good])
    with pytest.raises(DataError) as e:
        load_dataset("hh", "train", path=str(f))
    assert str(e.value).startswith(f"data.paths.hh: {f}:4: ")  # 1-based line, the blank line counted
    assert message in e.value.what and str(e.value).endswith("or set data.on_error=skip to skip broken rows and count them")
    assert (e.value.source, e.value.line, e.value.reason) == (str(f), 4, reason)
    _, report = load_dataset("hh", "train", path=str(f), on_error="skip")
    assert report.skipped == {reason: 1} and report.rows_read == 4 and report.pairs == 3


def test_hh_truncated_gz(tmp_path):
    rows = [json.dumps(hh(H1, f" a{i}", f" b{i}")) for i in range(2000)]
    blob = gzip.compress(("\n".join(rows) + "\n").encode())
    f = tmp_path / "harmless-base" / "test.jsonl.gz"
    f.parent.mkdir()
    f.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"harmless-base/test\.jsonl\.gz:\d+: file ends or is corrupt") as e:
        load_dataset("hh", "test", path=str(tmp_path))
    assert 1 < e.value.line <= 2000 and str(e.value).endswith("; the file is cut short or corrupt: fetch it again")
    _, report = load_dataset("hh", "test", path=str(tmp_path), on_error="skip")
    assert report.skipped == {"corrupt_file": 1}
    assert report.pairs == e.value.line - 1  # every complete line before the cut was read


# ----------------------------------------------------------------------------- TL;DR


def test_tldr_comparison_template_and_leading_space(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [comparison(post="Body text.\n", title="Help", texts=(" one ", "two\n"), choice=1)])
    groups, report = load_dataset("tldr", "train", path=str(f))
    (g,) = groups.values()
    assert g.prompt == "SUBREDDIT: r/relationships\nTITLE: Help\nPOST: Body text.\n\nTL;DR:"
    assert g.responses == [" two", " one"] and g.pairs == [(0, 1)] and g.sft_target == " two"
    assert g.truncation_mode == "keep_start"
    assert report.anomalies == {"summary_without_leading_space": 1}


def test_tldr_r_prefix_cnndm_and_splits(tmp_path):
    rows = [
        comparison(subreddit="r/Advice", split="valid1"),
        comparison(subreddit="Advice", split="valid2", texts=(" x", " y")),
        comparison(split="train"),
        {"info": {"id": "n1", "site": "dailymail", "title": "News", "article": "Story."}, "split": "valid2",
         "summaries": [{"text": " s1", "note": "-", "policy": "p"}, {"text": " s2", "note": "-", "policy": "p"}],
         "choice": 0, "worker": "w", "batch": "batch0_cnndm", "extra": {}},
        # the hub schema: every info field present, None where unused
        {"info": {"id": "n2", "post": None, "subreddit": None, "site": "cnn", "title": "T", "article": "A."},
         "split": "valid2", "summaries": [{"text": " s1"}, {"text": " s2"}], "choice": 1},
    ]
    groups, report = load_dataset("tldr", "test", path=str(write_jsonl(tmp_path / "c.jsonl", rows)))
    assert list(groups) == ["SUBREDDIT: r/Advice\nTITLE: A title\nPOST: My post.\nTL;DR:"]
    assert groups[list(groups)[0]].responses == [" first", " second", " x", " y"]
    assert report.anomalies == {"subreddit_has_r_prefix": 1, "cnndm_dropped": 2, "other_split": 1}
    assert (report.rows_read, report.pairs) == (5, 2)


@pytest.mark.parametrize("row, message", [
    (comparison(choice=2), "'choice' should be 0 or 1, is 2"),
    (comparison(texts=(" a", " b", " c")), "'summaries' should hold 2 summaries, has 3"),
    (comparison(post=None), "missing field info.'post'"),
    ({**comparison(), "choice": True}, "field 'choice' should be int, got bool"),
    ({**comparison(), "summaries": [{"text": " a"}, {"txt": " b"}]}, "missing field summaries[1].'text'"),
])
def test_tldr_broken_rows(tmp_path, row, message):
    f = write_jsonl(tmp_path / "batch3.json", [comparison(), row])
    with pytest.raises(DataError) as e:
        load_dataset("tldr", "train", path=str(f))
    assert str(e.value).startswith(f"data.paths.tldr: {f}:2: {message}; ")
    _, report = load_dataset("tldr", "train", path=str(f), on_error="skip")
    assert report.rows_skipped == 1 and report.pairs == 1


def test_tldr_json_array_file(tmp_path):
    f = tmp_path / "comparisons.json"
    f.write_text(json.dumps([comparison(), comparison(choice="0")]))
    with pytest.raises(DataError, match=r"comparisons\.json item 2: field 'choice' should be int, got str"):
        load_dataset("tldr", "train", path=str(f))


def test_tldr_filtered_sft_rows(tmp_path):
    rows = [{"subreddit": "r/AskReddit", "title": "Why?", "post": "Because.", "summary": "It is so. "},
            {"subreddit": "tifu", "title": "Oops", "post": "I did it.", "summary": " Did it."},
            {"subreddit": "tifu", "title": "Oops", "post": "I did it.", "summary": " Again."}]
    f = write_jsonl(tmp_path / "test.jsonl", rows)
    groups, report = load_dataset("tldr", "test", path=str(f), sft=True)
    assert list(groups) == ["SUBREDDIT: r/AskReddit\nTITLE: Why?\nPOST: Because.\nTL;DR:",
                            "SUBREDDIT: r/tifu\nTITLE: Oops\nPOST: I did it.\nTL;DR:"]
    first = groups["SUBREDDIT: r/AskReddit\nTITLE: Why?\nPOST: Because.\nTL;DR:"]
    assert (first.sft_target, first.responses, first.pairs) == (" It is so.", [" It is so."], [])
    assert report.anomalies == {"subreddit_has_r_prefix": 1, "summary_without_leading_space": 1,
                                "repeated_sft_prompt_first_kept": 1}
    with pytest.raises(DataError, match="pass sft=True"):
        load_dataset("tldr", "test", path=str(f))


# ----------------------------------------------------------------------------- hub and sample


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset by a recorder that returns the rows set in ``hub.rows``."""
    import datasets

    class Hub:
        rows: list = []
        calls: list = []

    def fake_load(*args, split, cache_dir=None):
        Hub.calls.append((args, split, cache_dir))
        return list(Hub.rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    return Hub


def test_hub_hh_rows_go_through_the_row_parser(fake_hub):
    fake_hub.rows = [hh(H1, " a", " b"), {"chosen": H1 + " c"}]
    with pytest.raises(DataError, match=r"^datasets=\[hh\] \(hub\): hub:Anthropic/hh-rlhf\[test\] row 1: missing field 'rejected'; "):
        load_dataset("hh", "test", cache_dir="/tmp/c")
    assert fake_hub.calls == [(("Anthropic/hh-rlhf",), "test", "/tmp/c")]
    groups, report = load_dataset("hh", "test", on_error="skip")
    assert report.source == "hub:Anthropic/hh-rlhf" and report.skipped == {"missing_field": 1}
    assert groups[H1].pairs == [(0, 1)]


def test_hub_tldr_names_and_splits(fake_hub):
    fake_hub.rows = [comparison(split="valid2"), comparison(split="valid1", texts=(" c", " d"))]
    groups, report = load_dataset("tldr", "test")
    assert fake_hub.calls[-1] == (("openai/summarize_from_feedback", "comparisons"), "validation", None)
    assert report.pairs == 2
    with pytest.raises(DataError, match=r"no train examples \(2 rows read; rules applied: other_split=2"):
        load_dataset("tldr", "train")
    assert fake_hub.calls[-1] == (("openai/summarize_from_feedback", "comparisons"), "train", None)
    fake_hub.rows = [{"id": "x", "subreddit": "tifu", "title": "T", "post": "P", "summary": " S"}]
    groups, _ = load_dataset("tldr", "train", sft=True)
    assert fake_hub.calls[-1] == (("UCL-DARK/openai-tldr-filtered",), "train", None)
    assert [g.sft_target for g in groups.values()] == [" S"]


def test_shipped_sample_loads():
    from caldpo.train.data import SAMPLE_DIR

    if not (SAMPLE_DIR / "train.jsonl").is_file():
        pytest.skip("the shipped sample (caldpo/train/sample) has not been written")
    for split in ("train", "test"):
        groups, report = load_dataset("sample", split)
        assert report.skipped == {} and report.pairs > 0
        assert all(g.truncation_mode == "keep_end" and g.prompt.endswith("\n\nAssistant:") for g in groups.values())


# ----------------------------------------------------------------------------- splits never leak


def _pairs(groups) -> set[tuple[str, str, str]]:
    return {(g.prompt, g.responses[i], g.responses[j]) for g in groups.values() for i, j in g.pairs}


def test_split_files_in_a_folder_are_never_shared(tmp_path):
    """The authors' preprocessed TL;DR folder (train.json / test.json JSON arrays) and a
    filtered-SFT folder (train/valid/test): each split reads its own file only."""
    pref = tmp_path / "tldr_pref"
    pref.mkdir()
    train_rows = [{"prompt": f"SUBREDDIT: r/a\nTITLE: T{i}\nPOST: P\nTL;DR:", "chosen": " c", "rejected": " r"} for i in range(3)]
    test_rows = [comparison(split="valid1", title="Held"), comparison(split="valid2", title="Out", texts=(" x", " y"))]
    (pref / "train.json").write_text(json.dumps(train_rows))
    (pref / "test.json").write_text(json.dumps(test_rows))
    train, train_report = load_dataset("tldr", "train", path=str(pref), held_out=0.5)
    test, test_report = load_dataset("tldr", "test", path=str(pref), held_out=0.5)
    assert [g.prompt for g in train.values()] == [r["prompt"] for r in train_rows]
    assert [g.prompt.split("\n")[1] for g in test.values()] == ["TITLE: Held", "TITLE: Out"]
    assert train_report.rows_read == 3 and test_report.rows_read == 2
    assert str(train_report).endswith("; split: own files train.json")
    assert str(test_report).endswith("; split: own files test.json")
    assert train[train_rows[0]["prompt"]].pair_sources == [f"{pref / 'train.json'} item 1"]
    sft = tmp_path / "tldr_sft"
    for i, split in enumerate(("train", "valid", "test")):
        write_jsonl(sft / f"{split}.jsonl", [{"subreddit": "s", "title": split, "post": "p", "summary": f" {i}"}])
    for split, title in (("train", "train"), ("test", "test")):  # test.* before valid.*
        groups, _ = load_dataset("tldr", split, path=str(sft), sft=True)
        assert [g.prompt for g in groups.values()] == [f"SUBREDDIT: r/s\nTITLE: {title}\nPOST: p\nTL;DR:"]
    (sft / "test.jsonl").unlink()
    groups, _ = load_dataset("tldr", "test", path=str(sft), sft=True)
    assert [g.sft_target for g in groups.values()] == [" 1"]  # valid.jsonl
    (pref / "test.json").unlink()
    with pytest.raises(DataError, match=r"^data.paths.tldr: .*tldr_pref: no test file .* beside train.json; add the "
                                        r"test split's own file"):
        load_dataset("tldr", "test", path=str(pref), held_out=0.5)


def test_one_file_is_cut_by_prompt_hash(tmp_path):
    """One HH .jsonl for both splits: a held-out cut by sha256 of the prompt, disjoint and complete."""
    import hashlib

    prompts = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(40)]
    rows = [hh(p, f" good {k}", f" bad {k}") for p in prompts for k in range(2)]  # two pairs per prompt
    f = write_jsonl(tmp_path / "all.jsonl", rows[::2] + rows[1::2])
    frac = 0.3
    expected_test = {p for p in prompts
                     if int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") < frac * 2 ** 64}
    assert 0 < len(expected_test) < len(prompts)
    train, train_report = load_dataset("hh", "train", path=str(f), held_out=frac)
    test, test_report = load_dataset("hh", "test", path=str(f), held_out=frac)
    assert set(test) == expected_test and set(train) == set(prompts) - expected_test
    assert all(len(g.pairs) == 2 for g in (*train.values(), *test.values()))  # a prompt's pairs stay together
    assert _pairs(train) | _pairs(test) == {(r["chosen"][:len(p)], r["chosen"][len(p):], r["rejected"][len(p):])
                                           for r, p in zip(rows, [p for p in prompts for _ in range(2)])}
    assert test_report.anomalies == {"other_split": 80 - 2 * len(expected_test)}
    assert "split: held-out cut by prompt: test = prompts whose sha256 falls in the first 0.3" in str(test_report)
    again, _ = load_dataset("hh", "test", path=str(f), held_out=frac)
    assert list(again) == list(test)
    # without a cut the caller means the whole file as that split (a test file read on its own)
    whole, report = load_dataset("hh", "test", path=str(f))
    assert len(whole) == 40 and report.split_rule == ""
    with pytest.raises(ValueError, match="held_out must be a fraction"):
        load_dataset("hh", "test", path=str(f), held_out=1.0)


def test_unnamed_tldr_file_routes_comparisons_by_row_and_cuts_the_rest(tmp_path):
    rows = [comparison(split="train", title="Tr"), comparison(split="valid1", title="Va"),
            {"prompt": "SUBREDDIT: r/x\nTITLE: pre\nPOST: p\nTL;DR:", "chosen": " a", "rejected": " b"}]
    f = write_jsonl(tmp_path / "mixed.jsonl", rows)
    train, _ = load_dataset("tldr", "train", path=str(f), held_out=0.999999)  # the cut puts 'pre' in test
    test, report = load_dataset("tldr", "test", path=str(f), held_out=0.999999)
    assert [p.split("\n")[1] for p in train] == ["TITLE: Tr"]
    assert [p.split("\n")[1] for p in test] == ["TITLE: Va", "TITLE: pre"]
    assert report.split_rule.startswith("comparison rows by their own 'split' field; other rows held-out cut")


def test_folder_faults(tmp_path):
    write_jsonl(tmp_path / "nested" / "sub" / "train.jsonl", [hh(H1, " a", " b")])
    with pytest.raises(DataError, match=r"split files lie in a subfolder \(sub/train.jsonl\); point it at .*nested/sub"):
        load_dataset("hh", "train", path=str(tmp_path / "nested"))
    write_jsonl(tmp_path / "only_bad" / "train.jsonl", [hh(H1, " same", " same")])
    with pytest.raises(DataError) as e:
        load_dataset("hh", "train", path=str(tmp_path / "only_bad"))
    assert str(e.value).startswith(f"data.paths.hh: {tmp_path / 'only_bad'}: no train examples in train.jsonl (1 rows")
    assert e.value.line is None
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("no data here")
    with pytest.raises(DataError, match=r"notes: no data files \(\.jsonl, \.jsonl\.gz, \.json, \.json\.gz, \.parquet\) "
                                        r"in this folder; point it at"):
        load_dataset("tldr", "test", path=str(tmp_path / "notes"))


@pytest.mark.parametrize("name, split", [("train.json", "train"), ("test.jsonl.gz", "test"), ("valid.jsonl", "test"),
                                         ("validation-00000-of-00001.parquet", "test"),
                                         ("train-00001-of-00004.parquet", "train"), ("batch3.json", None),
                                         ("trainer_notes.json", None), ("test.txt", None)])
def test_split_of_name(name, split):
    from pathlib import Path

    from caldpo.train.data import split_of_name

    assert split_of_name(Path(name)) == split


def test_cli_data_error_is_one_line_exit_2(tmp_path):
    """`python -m caldpo.train` on a broken JSON line: one line naming data.paths.sample, the file and
    line, and what to do; exit status 2, before any model loads. (A folder with no data files goes
    the same way: its DataError is checked in test_folder_faults.)"""
    import time

    from conftest import TINY, run_train

    bad = tmp_path / "bad"
    for split in ("train", "test"):
        write_jsonl(bad / f"{split}.jsonl", [hh(H1, " a", " b"), b'{"chosen": "\\n\\nHuman: x\\n\\nAssistant: y", '])
    t = time.perf_counter()
    proc = run_train([*TINY, f"data.paths.sample={bad}", f"run_dir={tmp_path / 'run'}"], check=False)
    took = time.perf_counter() - t
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"caldpo: data error: data.paths.sample: {bad / 'train.jsonl'}:2: bad JSON (")
    assert lines[0].endswith("; fix or delete that row, or set data.on_error=skip to skip broken rows and count them")
    assert took < 60 and not (tmp_path / "run" / "LATEST").exists()
