"""The load-time reports (data, tokens) share one counting and formatting base; their printed lines."""
from __future__ import annotations

from caldpo.train.batches import TokenReport
from caldpo.train.data import CountReport, DataReport


def test_data_and_token_reports_share_the_counts_and_print_as_before():
    d = DataReport("hh", "train", "hh/train.jsonl", rows_read=5, prompts=3, pairs=4)
    d.count("repeated_pair_kept")
    d.count("empty_final_reply", 2)
    d.skip("bad_json")
    d.skip("bad_json")
    assert isinstance(d, CountReport) and d.rows_skipped == 2
    assert str(d) == ("data hh/train from hh/train.jsonl: 5 rows -> 3 prompts, 4 pairs; rules applied: "
                      "empty_final_reply=2, repeated_pair_kept=1; rows skipped: bad_json=2")
    d.split_rule = "own files"
    assert str(d).endswith("; split: own files")

    t = TokenReport("hh", "test", 512, 256, examples=6, kept=4, prompts_cut=2, responses_cut=1)
    t.add(t.dropped, "identical_after_truncation")
    t.skip("eos_in_text")
    assert isinstance(t, CountReport) and t.rows_skipped == 1
    assert str(t) == ("tokens hh/test (max_length=512, max_prompt_length=256): 6 examples -> 4 kept; dropped: "
                      "identical_after_truncation=1; rows skipped: eos_in_text=1; prompts cut: 2, responses cut: 1")
    assert str(TokenReport("s", "train", 8, 4)).count("none") == 2
