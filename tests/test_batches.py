"""Tokenization, truncation, labels, collation and ordering of caldpo.train.batches.

The tokenizer maps each ASCII character to its code point, so expected ids are readable.
"""
from __future__ import annotations

import pytest
import torch

from _data_fixtures import EOS, EOS_ID, char_tokenizer, ids
from caldpo.train.batches import EOSInTextError, EpochOrder, Example, collate, epoch_order, flatten, tokenize_example
from caldpo.train.data import PromptGroup

M = -100


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_no_truncation_labels_mask_prompt(tok):
    ex = tokenize_example("Q:", " yes", " no", tok, max_length=32, max_prompt_length=16, truncation_mode="keep_end")
    assert ex["prompt"] == "Q:" and ex["chosen"] == "Q: yes" and ex["rejected"] == "Q: no"
    assert ex["chosen_response_only"] == " yes" and ex["rejected_response_only"] == " no"
    assert ex["prompt_input_ids"] == [81, 58]
    assert ex["chosen_input_ids"] == [81, 58, 32, 121, 101, 115, EOS_ID]
    assert ex["chosen_labels"] == [M, M, 32, 121, 101, 115, EOS_ID]
    assert ex["chosen_attention_mask"] == [1] * 7
    assert ex["rejected_input_ids"] == [81, 58, 32, 110, 111, EOS_ID]
    assert ex["rejected_labels"] == [M, M, 32, 110, 111, EOS_ID]


def test_sft_example_has_no_rejected_keys(tok):
    ex = tokenize_example("P", " t", None, tok, max_length=8, max_prompt_length=4, truncation_mode="keep_start")
    assert sorted(ex) == ["chosen", "chosen_attention_mask", "chosen_input_ids", "chosen_labels",
                          "chosen_response_only", "prompt", "prompt_attention_mask", "prompt_input_ids"]
    assert ex["chosen_labels"] == [M, 32, 116, EOS_ID]


def test_prompt_truncation_keep_end_vs_keep_start(tok):
    # prompt 10 + longer response (3 + EOS) = 14 > 12 -> prompt cut to 6; 6 + 4 fits.
    kw = dict(max_length=12, max_prompt_length=6)
    end = tokenize_example("0123456789", " ab", " c", tok, truncation_mode="keep_end", **kw)
    start = tokenize_example("0123456789", " ab", " c", tok, truncation_mode="keep_start", **kw)
    assert end["prompt_input_ids"] == ids("456789")
    assert start["prompt_input_ids"] == ids("012345")
    assert end["chosen_labels"] == [M] * 6 + ids(" ab") + [EOS_ID]
    assert start["rejected_input_ids"] == ids("012345 c") + [EOS_ID]
    assert start["rejected_labels"] == [M] * 6 + ids(" c") + [EOS_ID]
    # the shorter prompt is not truncated although the rejected response alone would fit
    fits = tokenize_example("0123456", " ab", " c", tok, truncation_mode="keep_end", **kw)
    assert fits["prompt_input_ids"] == ids("0123456")


def test_response_truncation_cuts_eos(tok):
    # prompt 10 -> 4 (keep_end); 4 + 9 > 10 -> responses cut to 10 - 4 = 6 tokens, EOS lost.
    ex = tokenize_example("0123456789", " abcdefg", " xy", tok, max_length=10, max_prompt_length=4,
                          truncation_mode="keep_end")
    assert ex["prompt_input_ids"] == ids("6789")
    assert ex["chosen_input_ids"] == ids("6789 abcde")
    assert ex["chosen_labels"] == [M] * 4 + ids(" abcde")
    assert EOS_ID not in ex["chosen_input_ids"]
    assert ex["rejected_input_ids"] == ids("6789 xy") + [EOS_ID]  # short enough to keep its EOS
    assert len(ex["chosen_input_ids"]) <= 10


def test_eos_in_text_rejected(tok):
    with pytest.raises(EOSInTextError, match="the chosen response contains the EOS token"):
        tokenize_example("P", f" a{EOS}b", " c", tok, max_length=32, max_prompt_length=8, truncation_mode="keep_end")
    with pytest.raises(EOSInTextError, match="the prompt contains"):
        tokenize_example(f"{EOS}P", " a", None, tok, max_length=32, max_prompt_length=8, truncation_mode="keep_end")
    with pytest.raises(ValueError, match="unknown truncation mode"):
        tokenize_example("P", " a", None, tok, max_length=32, max_prompt_length=8, truncation_mode="middle")


def test_empty_response_is_just_eos(tok):
    ex = tokenize_example("P", "", " x", tok, max_length=32, max_prompt_length=8, truncation_mode="keep_end")
    assert ex["chosen_labels"] == [M, EOS_ID]


def test_collate_pads_right_and_prompt_left(tok):
    kw = dict(max_length=32, max_prompt_length=8, truncation_mode="keep_end")
    a = tokenize_example("AB", " x", " yz", tok, **kw)
    b = tokenize_example("C", " long", " w", tok, **kw)
    batch = collate([a, b], pad_token_id=0)
    assert batch["prompt"] == ["AB", "C"] and batch["chosen_response_only"] == [" x", " long"]
    assert batch["chosen_input_ids"].dtype == torch.long
    assert batch["chosen_input_ids"].tolist() == [[65, 66, 32, 120, EOS_ID, 0, 0],
                                                  [67, 32, 108, 111, 110, 103, EOS_ID]]
    assert batch["chosen_labels"].tolist() == [[M, M, 32, 120, EOS_ID, M, M],
                                               [M, 32, 108, 111, 110, 103, EOS_ID]]
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]
    assert batch["rejected_input_ids"].tolist() == [[65, 66, 32, 121, 122, EOS_ID], [67, 32, 119, EOS_ID, 0, 0]]
    assert batch["prompt_input_ids"].tolist() == [[65, 66], [0, 67]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1], [0, 1]]


def test_flatten():
    g1 = PromptGroup("p1", [" a", " b", " c"], [(0, 1), (2, 0)], " a", "keep_end")
    g2 = PromptGroup("p2", [" t"], [], " t", "keep_start")
    groups = {"p1": g1, "p2": g2}
    g1.pair_sources, g1.sft_source, g2.sft_source = ["f:1", "f:3"], "f:1", "f:2"
    # groups built without their reference order: each group its own, its pairs ranked in order
    assert flatten(groups, sft=False) == [Example("p1", " a", " b", "keep_end", "f:1", order=(0, 0)),
                                          Example("p1", " c", " a", "keep_end", "f:3", order=(0, 1))]
    assert flatten(groups, sft=True) == [Example("p1", " a", None, "keep_end", "f:1", order=(0, 0)),
                                         Example("p2", " t", None, "keep_start", "f:2", order=(1, 0))]
    g1.pair_order, g1.sft_order = [(3, 5), (0, 9)], (3, 5)
    assert [ex.order for ex in flatten(groups, sft=False)] == [(3, 5), (0, 9)]
    assert [ex.order for ex in flatten(groups, sft=True)] == [(3, 5), (1, 0)]
    assert flatten(groups, sft=True)[1].source == "f:2" and flatten(groups, sft=True)[1].tokens is None


def test_epoch_order_deterministic_permutation():
    """A permutation fixed by seed and epoch; epoch 1 is epoch 0 shuffled again (cumulative), each shuffle
    seeded by numpy's draws from the seed (tests/test_schedule.py holds the reference iterator written out)."""
    import random

    import numpy as np

    o = epoch_order(50, epoch=0, seed=0)
    assert sorted(o) == list(range(50)) and o != list(range(50))
    assert o == epoch_order(50, epoch=0, seed=0)
    s0, s1 = (int(v) for v in np.random.RandomState(0).randint(0, 2 ** 32, size=2))
    first = list(range(50))
    random.Random(s0).shuffle(first)
    assert o == first
    random.Random(s1).shuffle(first)
    assert epoch_order(50, epoch=1, seed=0) == first
    assert epoch_order(50, epoch=0, seed=1) != o
    assert epoch_order(5, epoch=3, seed=7, shuffle=False) == [0, 1, 2, 3, 4]
    # groups: shuffled as units, a group's examples in row order, an empty group still takes a shuffle slot
    grouped = epoch_order(5, epoch=0, seed=0, groups=[2, 0, 2, 1, 0], n_groups=4, ranks=[2, 1, 0, 0, 0])
    units = list(range(4))
    random.Random(s0).shuffle(units)
    assert grouped == [i for g in units for i in {0: [4, 1], 1: [3], 2: [2, 0], 3: []}[g]]
    # positions in the reference's walk count the rows it has and caldpo dropped (group 2's rank 1, group 3)
    order = EpochOrder(5, 0, groups=[2, 0, 2, 1, 0], n_groups=4, ranks=[2, 1, 0, 0, 0], sizes=[2, 1, 3, 2])
    starts, at = {}, 0
    for g in units:
        starts[g], at = at, at + [2, 1, 3, 2][g]
    ranks = [2, 1, 0, 0, 0]
    assert order.positions(0) == [(i, starts[g] + ranks[i]) for g in units for i in {0: [4, 1], 1: [3], 2: [2, 0],
                                                                                        3: []}[g]]
    assert order.reference_examples == 8 and order(0) == grouped
