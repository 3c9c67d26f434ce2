"""The shipped HH-format sample: reproducible byte for byte, and valid HH rows."""
import json

import pytest

from caldpo.train import sample

ASSISTANT = "\n\nAssistant:"


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _prompt(text):
    return text[: text.rindex(ASSISTANT) + len(ASSISTANT)]


def test_regeneration_reproduces_shipped_files(tmp_path):
    paths = sample.write(tmp_path)
    assert [p.name for p in paths] == ["train.jsonl", "test.jsonl"]
    for split in sample.SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == sample.sample_path(split).read_bytes()


def test_cli_writes_to_out(tmp_path):
    sample.main(["--out", str(tmp_path / "o")])
    assert (tmp_path / "o" / "test.jsonl").read_bytes() == sample.sample_path("test").read_bytes()


def test_sample_path_rejects_unknown_split():
    with pytest.raises(ValueError):
        sample.sample_path("validation")


@pytest.mark.parametrize("split,n", [("train", sample.N_TRAIN), ("test", sample.N_TEST)])
def test_rows_are_valid_hh(split, n):
    rows = _rows(sample.sample_path(split))
    assert len(rows) == n
    for row in rows:
        assert set(row) == {"chosen", "rejected"}
        chosen, rejected = row["chosen"], row["rejected"]
        assert chosen != rejected
        for text in (chosen, rejected):
            assert text.startswith("\n\nHuman: ")
            # turns alternate Human, Assistant, ..., Assistant
            turns = [t.split(":", 1)[0] for t in text.split("\n\n")[1:]]
            assert turns == ["Human", "Assistant"] * (len(turns) // 2)
        prompt = _prompt(chosen)
        assert _prompt(rejected) == prompt
        for text in (chosen, rejected):
            response = text[len(prompt):]
            assert response.startswith(" ") and response.strip() and "\n\n" not in response


def test_train_and_test_prompts_differ():
    prompts = {s: {_prompt(r["chosen"]) for r in _rows(sample.sample_path(s))} for s in sample.SPLITS}
    assert not prompts["train"] & prompts["test"]


def test_rows_are_distinct_and_preference_is_mixed():
    rows = _rows(sample.sample_path("train"))
    assert len({(r["chosen"], r["rejected"]) for r in rows}) == len(rows)
    rejected = [r["rejected"][len(_prompt(r["rejected"])):].strip() for r in rows]
    refusals = sum(r in sample.RUDE + sample.UNHELPFUL for r in rejected)
    multi_turn = sum(r["chosen"].count("\n\nHuman: ") > 1 for r in rows)
    # both the style signal (refusals) and the content signal (wrong facts) are present
    assert 0.25 * len(rows) < refusals < 0.75 * len(rows)
    assert multi_turn > 0.1 * len(rows)


def test_facts_are_right_in_chosen_and_wrong_in_rejected():
    """The content signal: same wording, the fact is correct only on the chosen side."""
    import re

    ops = {"plus": lambda a, b: a + b, "times": lambda a, b: a * b, "minus": lambda a, b: a - b}
    capitals = dict(sample.CAPITALS)
    arith = re.compile(r"(\d+) (plus|times|minus) (\d+) is (\d+)\.$")
    capital = re.compile(r"The capital of (.+) is (.+)\.$")
    n_checked = 0
    for split in sample.SPLITS:
        for row in _rows(sample.sample_path(split)):
            prompt = _prompt(row["chosen"])
            for side, truth in (("chosen", True), ("rejected", False)):
                reply = row[side][len(prompt):]
                if m := arith.search(reply):
                    a, op, b, c = m.groups()
                    assert (ops[op](int(a), int(b)) == int(c)) is truth, row
                    n_checked += 1
                elif m := capital.search(reply):
                    assert (capitals[m.group(1)] == m.group(2)) is truth, row
                    n_checked += 1
                elif truth:
                    assert reply.strip() not in sample.RUDE + sample.UNHELPFUL, row
    assert n_checked > 150


def test_text_is_plain_ascii():
    for split in sample.SPLITS:
        assert sample.sample_path(split).read_bytes().isascii()
