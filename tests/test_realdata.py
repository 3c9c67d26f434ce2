"""Every genuine row of tests/data/realdata (see its SOURCES.md) through the loaders and tokenizer.

The counts below were read off the rows by hand: HH sample lines 34, 36, 38, 39, 70, 77
have a chosen side with two Assistant turns in a row; lines 28, 29, 32, 33, 66, 72, 78, 82
end in an empty reply; lines 71 and 83 have chosen == rejected.
"""
from __future__ import annotations

import json

import pytest

from _data_fixtures import REALDATA, SHARED_REALDATA, char_tokenizer
from caldpo.train.batches import collate, flatten, tokenize_example
from caldpo.train.data import DataError, load_dataset, split_hh
from caldpo.train.preproc import tldr_pref

HH = REALDATA / "hh_rlhf_sample.jsonl"
TLDR = REALDATA / "tldr_comparisons_sample.jsonl"


def test_real_rows_are_shipped():
    """The rows travel with the tests (never a skip in a fresh clone), and equal the team's copy where it exists."""
    assert HH.is_file() and TLDR.is_file(), f"real data rows missing from {REALDATA}"
    for name in (HH.name, TLDR.name):
        if (SHARED_REALDATA / name).is_file():
            assert (REALDATA / name).read_bytes() == (SHARED_REALDATA / name).read_bytes(), name


def hh_rows() -> list[dict]:
    return [json.loads(line) for line in HH.read_text(encoding="utf-8").splitlines()]


def test_hh_counts():
    groups, report = load_dataset("hh", "test", path=str(HH))
    assert report.rows_read == 83 and report.skipped == {}
    assert report.anomalies == {"prompt_not_shared": 6, "empty_final_reply": 8, "identical_pair_dropped": 2}
    assert (report.prompts, report.pairs) == (81, 81)
    assert all(g.responses[i] != g.responses[j] for g in groups.values() for i, j in g.pairs)
    assert str(report) == (f"data hh/test from {HH}: 83 rows -> 81 prompts, 81 pairs; rules applied: "
                           "empty_final_reply=8, identical_pair_dropped=2, prompt_not_shared=6; rows skipped: none")


def test_hh_split_is_exact_for_every_row():
    for n, row in enumerate(hh_rows(), 1):
        prompt, c, r, not_shared = split_hh(row["chosen"], row["rejected"])
        assert prompt + c == row["chosen"] and prompt + r == row["rejected"], n
        assert prompt.endswith("\n\nAssistant:") and prompt.startswith("\n\nHuman: "), n
        assert not_shared == (n in (34, 36, 38, 39, 70, 77)), n
        if not not_shared:  # the reference rule: chosen up to its last Assistant tag
            assert len(prompt) == row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:"), n


def test_hh_prompt_not_shared_rows_split_at_longest_shared_prefix():
    rows = hh_rows()
    prompt, c, r, _ = split_hh(rows[69]["chosen"], rows[69]["rejected"])  # line 70
    assert prompt.endswith("\n\nHuman: What is DVT?\n\nAssistant:") and prompt.count("\n\nAssistant:") == 1
    assert c.startswith(" This could be DVT, or Deep Vein Thrombosis.")
    assert r.startswith(" I think you mean Deep Vein Thrombosis")
    prompt, c, r, _ = split_hh(rows[76]["chosen"], rows[76]["rejected"])  # line 77
    assert prompt == "\n\nHuman: How much do solar panels cost?\n\nAssistant:"
    assert c.startswith(" Umm. Just a second...\n\nAssistant: A solar panel should cost about $50 to $80")
    assert r.startswith(" To get a price from a single solar panel manufacturer")
    # the reference slicing (rejected[len(chosen's prompt):]) would have cut into rejected's reply
    ref_prompt_len = rows[76]["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
    assert ref_prompt_len == 85 and len(prompt) == 51
    assert rows[76]["rejected"][ref_prompt_len:].startswith("r panel manufacturer, you can")  # mid-word


def test_hh_empty_reply_kept():
    groups, _ = load_dataset("hh", "test", path=str(HH))
    rows = hh_rows()
    prompt = rows[31]["chosen"][: -1]  # line 32 chosen ends "\n\nAssistant: "
    assert prompt.endswith("\n\nHuman: list of profane bad words\n\nAssistant:")
    assert groups[prompt].responses == [" ", " Ok"] and groups[prompt].pairs == [(0, 1)]


def test_hh_sft_keeps_identical_rows_prompts():
    groups, report = load_dataset("hh", "test", path=str(HH), sft=True)
    assert report.prompts == 83 and report.pairs == 81
    target = next(g.sft_target for p, g in groups.items() if p.endswith("Okay thank you for that\n\nAssistant:"))
    assert target == " You’re welcome!"


def test_tldr_loader_counts():
    groups, report = load_dataset("tldr", "test", path=str(TLDR))
    assert report.rows_read == 21 and report.skipped == {}
    assert report.anomalies == {"cnndm_dropped": 2, "subreddit_has_r_prefix": 5, "summary_without_leading_space": 10}
    assert (report.prompts, report.pairs) == (13, 19)
    grandma = next(g for p, g in groups.items() if p.startswith("SUBREDDIT: r/AskReddit\nTITLE: My girlfriends grandma"))
    assert len(grandma.responses) == 4 and len(grandma.pairs) == 6  # sample lines 7-12: one post, six comparisons
    first = next(iter(groups.values()))
    assert first.prompt.startswith("SUBREDDIT: r/relationships\nTITLE: Unsure if new relationship")
    assert first.prompt.endswith("\n\nAidan\nTL;DR:")
    assert first.sft_target.startswith(" Started dating this") and not first.sft_target.endswith(" ")
    edited = groups[next(p for p in groups if "TITLE: Me [27 F] with my boyfriend [24 M]" in p)]
    assert edited.prompt.startswith("SUBREDDIT: r/relationships\nTITLE: Me [27 F] with my boyfriend [24 M] for four")
    assert edited.responses[edited.pairs[0][0]] == (
        " Boyfriend talks very slowly, I feel frustrated and sometimes want to tell him to hurry up - how do I deal with this?")
    with pytest.raises(DataError, match=r"no train examples \(21 rows read; rules applied: other_split=21; "):
        load_dataset("tldr", "train", path=str(TLDR))  # every sample row is from valid1/valid2


def test_tldr_via_preproc(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no train examples"):  # validation rows only: nothing written
        tldr_pref([str(TLDR)], str(out))
    assert not (out / "train.jsonl").exists()
    train_row = json.loads(TLDR.read_text().splitlines()[0])
    (tmp_path / "extra.json").write_text(json.dumps({**train_row, "split": "train"}) + "\n")
    reports = tldr_pref([str(TLDR), str(tmp_path / "extra.json")], str(out))
    assert (reports["test"].rows_read, reports["test"].pairs, reports["test"].prompts) == (21, 19, 13)
    assert reports["train"].pairs == 1
    assert reports["test"].anomalies == {"cnndm_dropped": 2, "subreddit_has_r_prefix": 5, "summary_without_leading_space": 10}
    via_files, report = load_dataset("tldr", "test", path=str(out))
    direct, _ = load_dataset("tldr", "test", path=str(TLDR))
    assert via_files == direct and report.rows_read == 19


@pytest.mark.parametrize("name, path, max_length, max_prompt_length", [
    ("hh", HH, 512, 256), ("hh", HH, 64, 32), ("tldr", TLDR, 512, 256), ("tldr", TLDR, 64, 32)])
def test_tokenize_every_pair(name, path, max_length, max_prompt_length):
    tok = char_tokenizer()
    groups, _ = load_dataset(name, "test", path=str(path))
    examples = [tokenize_example(p, c, r, tok, max_length=max_length, max_prompt_length=max_prompt_length,
                                 truncation_mode=m) for p, c, r, m, *_ in flatten(groups, sft=False)]
    assert len(examples) == (81 if name == "hh" else 19)
    for ex in examples:
        for side in ("chosen", "rejected"):
            assert len(ex[f"{side}_input_ids"]) <= max_length
            n_prompt = len(ex["prompt_input_ids"])
            assert ex[f"{side}_labels"][:n_prompt] == [-100] * n_prompt
            assert ex[f"{side}_labels"][n_prompt:] == ex[f"{side}_input_ids"][n_prompt:]
    batch = collate(examples[:8], pad_token_id=tok.pad_token_id)
    assert batch["chosen_input_ids"].shape == batch["chosen_labels"].shape


def reference_tokenize(prompt, chosen, rejected, truncation_mode, tokenizer, max_length, max_prompt_length):
    """Oracle: the reference ``tokenize_batch_element`` written as the DPO repository does it."""
    chosen_tokens = dict(tokenizer(chosen, add_special_tokens=False))
    rejected_tokens = dict(tokenizer(rejected, add_special_tokens=False))
    prompt_tokens = dict(tokenizer(prompt, add_special_tokens=False))
    chosen_tokens["input_ids"].append(tokenizer.eos_token_id)
    chosen_tokens["attention_mask"].append(1)
    rejected_tokens["input_ids"].append(tokenizer.eos_token_id)
    rejected_tokens["attention_mask"].append(1)
    longer_response_length = max(len(chosen_tokens["input_ids"]), len(rejected_tokens["input_ids"]))
    if len(prompt_tokens["input_ids"]) + longer_response_length > max_length:
        if truncation_mode == "keep_start":
            prompt_tokens = {k: v[:max_prompt_length] for k, v in prompt_tokens.items()}
        else:
            prompt_tokens = {k: v[-max_prompt_length:] for k, v in prompt_tokens.items()}
    if len(prompt_tokens["input_ids"]) + longer_response_length > max_length:
        chosen_tokens = {k: v[: max_length - max_prompt_length] for k, v in chosen_tokens.items()}
        rejected_tokens = {k: v[: max_length - max_prompt_length] for k, v in rejected_tokens.items()}
    chosen_seq = {k: prompt_tokens[k] + chosen_tokens[k] for k in chosen_tokens}
    rejected_seq = {k: prompt_tokens[k] + rejected_tokens[k] for k in rejected_tokens}
    n = len(prompt_tokens["input_ids"])
    chosen_seq["labels"] = [-100] * n + chosen_seq["input_ids"][n:]
    rejected_seq["labels"] = [-100] * n + rejected_seq["input_ids"][n:]
    batch = {"prompt": prompt, "chosen": prompt + chosen, "rejected": prompt + rejected,
             "chosen_response_only": chosen, "rejected_response_only": rejected}
    for k, toks in {"chosen": chosen_seq, "rejected": rejected_seq, "prompt": prompt_tokens}.items():
        for type_key, tokens in toks.items():
            if type_key != "token_type_ids":
                batch[f"{k}_{type_key}"] = tokens
    return batch


@pytest.mark.parametrize("sft", [False, True])
@pytest.mark.parametrize("max_length, max_prompt_length", [(512, 256), (96, 48)])
def test_matches_reference_tokenization(sft, max_length, max_prompt_length):
    from caldpo.train.tiny import build_tokenizer

    tok = build_tokenizer()
    n_cut = 0
    for name, path in (("hh", HH), ("tldr", TLDR)):
        groups, _ = load_dataset(name, "test", path=str(path), sft=sft)
        for p, c, r, mode, *_ in flatten(groups, sft=sft):
            ours = tokenize_example(p, c, r, tok, max_length=max_length, max_prompt_length=max_prompt_length,
                                    truncation_mode=mode)
            ref = reference_tokenize(p, c, c if r is None else r, mode, tok, max_length, max_prompt_length)
            if r is None:  # the reference SFT path tokenizes (prompt, target, target) and drops rejected keys
                ref = {k: v for k, v in ref.items() if "rejected" not in k}
            assert ours == ref
            n_cut += tok.eos_token_id not in ours["chosen_input_ids"]
    assert n_cut > 0  # response truncation (EOS cut) is exercised in both settings
