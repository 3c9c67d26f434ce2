"""The path from examples to micro-batches (schedule.py), cross-rank metric means (distributed.py),
and the run directory's STOP / DONE files (rundir.py)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from caldpo.train.batches import Encoded, Example
from caldpo.train.distributed import MetricSums, Process
from caldpo.train.layout import PackedBatch
from caldpo.train.rundir import clear_stop, read_done, request_stop, stop_requested, write_done
from caldpo.train.schedule import BatchSchedule, Collator


def test_schedule_walks_epochs_in_fixed_permutations():
    """Positions past the end of an epoch continue in the next epoch's permutation; each epoch
    holds every example once; the same seed gives the same order, another seed another."""
    n = 7
    sched = BatchSchedule(n, seed=3)
    first = sched.indices(0, 3 * n)
    for e in range(3):
        assert sorted(first[e * n:(e + 1) * n]) == list(range(n))
    assert first[:n] != first[n:2 * n]  # each epoch is shuffled anew
    # any window equals the slice of the whole walk (resume from a count of examples is exact)
    for start, count in ((0, 1), (5, 4), (6, 9), (13, 8)):
        assert BatchSchedule(n, seed=3).indices(start, count) == first[start:start + count]
    assert BatchSchedule(n, seed=4).indices(0, 3 * n) != first


def test_each_epoch_drops_its_partial_batch_as_the_reference_iterator():
    """The reference code's batch iterator starts every epoch with an empty batch: an epoch of n examples
    yields n // batch_size batches of its own permutation, and the last n % batch_size are never trained.
    Written out here from that rule (not from BatchSchedule) and compared step by step over 3 epochs."""
    from caldpo.train.batches import epoch_order

    n, bs, seed = 11, 4, 5
    expected = []
    for epoch in range(3):
        order, batch = epoch_order(n, epoch, seed), []
        for i in order:
            batch.append(i)
            if len(batch) == bs:
                expected.append(batch)
                batch = []
    sched = BatchSchedule(n, seed, batch_size=bs)
    assert sched.epoch_examples == 8
    assert [sched.indices(s * bs, bs) for s in range(len(expected))] == expected
    with pytest.raises(ValueError, match="cannot fill one batch"):
        BatchSchedule(3, seed, batch_size=4)


def test_micro_batches_cover_the_step_once_across_ranks():
    indices = list(range(100, 116))
    world, ga = 2, 4
    seen = []
    for rank in range(world):
        chunks = BatchSchedule(50, 0, rank=rank, world=world, accumulation_steps=ga).micro_batches(indices)
        assert len(chunks) == ga and all(len(c) == len(indices) // (world * ga) for c in chunks)
        seen += [i for c in chunks for i in c]
    assert seen == indices  # contiguous shares, in order, each index once


class _Tok:
    pad_token_id = 0


def _example(rng: random.Random, prompt: int, chosen: int, rejected: int | None) -> Example:
    def ids(k):
        return np.array([rng.randrange(1, 50) for _ in range(k)], dtype=np.int32)

    enc = Encoded(ids(prompt), ids(chosen), ids(rejected) if rejected is not None else None, False, False)
    return Example("p", "c", "r" if rejected is not None else None, "keep_start", "", enc)


@pytest.mark.parametrize("sft", [False, True])
def test_collator_counts_tokens_alike_in_every_layout(sft):
    """tokens = non-padding tokens of chosen and rejected, the prompt counted in each, computed here from
    the lengths; padded batches run every sequence at the widest length, packed ones no padding and
    prefix_shared the shared prompt once; packed layouts build no padded copy."""
    rng = random.Random(0)
    shapes = [(5, 3, None if sft else 4), (2, 6, None if sft else 1), (7, 2, None if sft else 5)]
    items = [_example(rng, *s) for s in shapes]
    lengths = [p + c for p, c, _ in shapes] + ([] if sft else [p + r for p, _, r in shapes])
    batches = {}
    for layout in ("padded", "packed", "prefix_shared"):
        if sft and layout == "prefix_shared":
            continue
        coll = Collator(_Tok(), max_length=64, max_prompt_length=32, layout=layout, sft=sft)
        b = coll(items, [4, 5, 6], "train")
        batches[layout] = b
        assert b["n_pairs"] == 3 and b["example_index"] == [4, 5, 6] and b["split"] == "train"
        assert b["tokens"] == sum(lengths) and b["sequences"] == len(lengths)
        if layout == "padded":
            assert b["backbone_tokens"] == len(lengths) * max(lengths)
            assert int(b["chosen_attention_mask"].sum()) == sum(p + c for p, c, _ in shapes)
        else:
            assert isinstance(b["packed"], PackedBatch)
            assert not any(k.endswith("_input_ids") for k in b)
    assert batches["packed"]["backbone_tokens"] == sum(lengths)
    if not sft:  # the prompt and the responses' common first tokens run once per pair
        shared = sum(p for p, _, _ in shapes)
        assert batches["prefix_shared"]["backbone_tokens"] <= sum(lengths) - shared


def test_metric_means_weight_examples_not_batches():
    """Means over micro-batches of different sizes, with a weight-0 dummy batch, against float64 by hand."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(k, generator=g) for k in (3, 5, 1)]
    sums = MetricSums()
    for p in parts:
        sums.add({"loss": p, "acc": (p > 0).float()})
    sums.add({"loss": torch.full((4,), 1e6), "acc": torch.ones(4)}, weight=0.0)
    sums.add_totals(tokens=3, backbone_tokens=2.5)
    sums.add_totals(tokens=4)
    got = sums.means(Process(0, 1, 0, torch.device("cpu"), fsdp=False))
    assert got["tokens"] == 7 and got["backbone_tokens"] == 2.5
    every = torch.cat(parts).double()
    assert got["loss"] == pytest.approx(float(every.mean()), rel=1e-6)
    assert got["acc"] == pytest.approx(float((every > 0).double().mean()), rel=1e-6)
    assert MetricSums().means(Process(0, 1, 0, torch.device("cpu"), fsdp=False)) == {}


def test_process_any_one_collective_for_several_flags():
    p = Process(0, 1, 0, torch.device("cpu"), fsdp=False)
    assert p.any(True) is True and p.any(torch.tensor(False)) is False
    assert p.any(torch.tensor(False), True, torch.tensor(float("nan")) != 0) == [False, True, True]


def test_process_share_gives_every_rank_a_forward():
    chunk = list(range(10, 15))  # the last, short chunk of an evaluation with chunk size 8, 4 ranks
    shares = [Process(r, 4, r, torch.device("cpu"), fsdp=False).share(chunk, 8) for r in range(4)]
    assert shares[0] == ([10, 11], 1.0) and shares[1] == ([12, 13], 1.0) and shares[2] == ([14], 1.0)
    assert shares[3] == ([10], 0.0)  # nothing left: a dummy forward that counts for nothing


def test_stop_and_done_files(tmp_path):
    run_dir = tmp_path / "a" / "run"
    assert not stop_requested(run_dir) and read_done(run_dir) is None
    request_stop(run_dir)
    assert stop_requested(run_dir)
    clear_stop(run_dir)
    clear_stop(run_dir)  # clearing twice is fine
    assert not stop_requested(run_dir)
    write_done(run_dir, {"step": 3, "loss": torch.tensor(0.5).item()})
    assert read_done(run_dir) == {"step": 3, "loss": 0.5}
    assert json.loads((run_dir / "DONE").read_text())["step"] == 3
    assert not (run_dir / "DONE.tmp").exists()


def _reference_batches(flat_data, seed: int, n_epochs: int, batch_size: int) -> list[list[tuple]]:
    """The reference code's batch iterator (preference mode, shuffle on, n_epochs set), written out
    without tokenization: each epoch seeds Python's ``random`` with seed + epoch, shuffles the
    per-prompt entries, walks each prompt's pairs in turn, and starts with an empty batch."""
    state = random.getstate()
    try:
        out = []
        for epoch in range(n_epochs):
            random.seed(seed + epoch)
            data = list(flat_data)
            random.shuffle(data)
            batch = []
            for prompt, responses, pairs in data:
                for i, j in pairs:
                    batch.append((prompt, responses[i], responses[j]))
                    if len(batch) == batch_size:
                        out.append(batch)
                        batch = []
        return out
    finally:
        random.setstate(state)


def test_batches_follow_the_reference_iterators_order(tmp_path):
    """HH rows where prompts repeat (several pairs per prompt): the trainer's batches over 3 epochs are
    the reference iterator's, pair for pair."""
    from _data_fixtures import hh, write_jsonl

    from caldpo.train.config import load_config
    from caldpo.train.data import load_dataset
    from caldpo.train.schedule import Examples

    rng = random.Random(1)
    rows = []
    for k in range(23):
        prompt = f"\n\nHuman: question {k % 9}?\n\nAssistant:"  # 9 prompts, 1-4 pairs each
        rows.append(hh(prompt, f" answer {k} {rng.random():.3f}", f" other {k}"))
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:2])
    groups, _ = load_dataset("hh", "train", path=str(tmp_path))
    assert len(groups) == 9 and max(len(g.pairs) for g in groups.values()) > 1
    flat = [(g.prompt, g.responses, g.pairs) for g in groups.values()]
    expected = _reference_batches(flat, seed=0, n_epochs=3, batch_size=4)

    data = Examples(load_config(["datasets=[hh]", f"data.paths.hh={tmp_path}"]), "train", sft=False, verbose=False)
    sched = BatchSchedule(len(data), 0, batch_size=4, groups=data.group_of, n_groups=data.n_groups)
    got = [[(data.items[i].prompt, data.items[i].chosen, data.items[i].rejected) for i in sched.indices(s * 4, 4)]
           for s in range(len(expected))]
    assert len(expected) == 3 * (23 // 4) and got == expected


def test_examples_fingerprint_follows_every_change_of_the_split(tmp_path):
    """``Examples.fingerprint`` (what a resume checkpoint records): equal for the same examples, different after
    rows are reordered, added, edited or removed, or the truncation changes; the other split's rows do not
    enter it."""
    import shutil

    from caldpo.train.config import load_config
    from caldpo.train.data import SAMPLE_DIR
    from caldpo.train.schedule import Examples

    data = tmp_path / "data"
    shutil.copytree(SAMPLE_DIR, data)
    train = data / "train.jsonl"
    lines = train.read_text().splitlines(keepends=True)

    def fp(*over: str, text: list[str] | None = None) -> str:
        train.write_text("".join(lines if text is None else text))
        cfg = load_config(["model=tiny", "datasets=[sample]", f"data.paths.sample={data}", *over])
        return Examples(cfg, "train", sft=False, verbose=False).fingerprint

    base = fp()
    assert len(base) == 64 and fp() == base
    edited = json.loads(lines[3])
    edited["rejected"] += " Really."
    changed = {"reordered": fp(text=lines[1:] + lines[:1]), "added": fp(text=lines + lines[:1]),
               "removed": fp(text=lines[:-1]), "edited": fp(text=lines[:3] + [json.dumps(edited) + "\n"] + lines[4:]),
               "max_length": fp("max_length=100", "max_prompt_length=50")}
    assert all(v != base for v in changed.values()) and len(set(changed.values())) == len(changed)
    (data / "test.jsonl").write_text((data / "test.jsonl").read_text().splitlines(keepends=True)[0])
    assert fp() == base
