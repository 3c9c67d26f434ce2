"""The path from examples to micro-batches (schedule.py), cross-rank metric means (distributed.py),
and the run directory's STOP / DONE files (rundir.py)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from caldpo.train.batches import Encoded, Example
from caldpo.train.distributed import MetricSums, Process
from caldpo.train.layout import PackedBatch
from caldpo.train.rundir import clear_stop, read_done, request_stop, stop_requested, write_done
from caldpo.train.schedule import BatchSchedule, Collator, evaluation_indices


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


def test_a_split_smaller_than_a_batch_is_refused():
    with pytest.raises(ValueError, match="cannot fill one batch"):
        BatchSchedule(3, 0, batch_size=4)


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


# ----------------------------------------------------------------------------- the reference iterator
#
# The Cal-DPO authors' data module is a fork of the original DPO repository's preference_datasets.py
# (eric-mitchell/direct-preference-optimization; Cal-DPO/Cal-DPO Pythia-2.8b-exp). Its rule, written out
# below with the loop structure of get_batch_iterator, over row numbers instead of tokenized texts:
# * get_hh keys a dict by the prompt cut from `chosen` at its last "\n\nAssistant:" and appends each row's
#   pair there (every row, identical chosen/rejected included); get_tldr keys by row index + prompt, so every
#   TL;DR row is an entry; flat_data holds one entry per key, in the dict's order (first appearance);
# * under TemporarilySeededRandom(seed) (random.seed and np.random.seed) it draws
#   permutation_seeds = iter(np.random.randint(0, 2**32, size=1000000));
# * each epoch shuffles the same flat_data list in place (random.shuffle under the next permutation seed),
#   so shuffles accumulate, then walks each entry's pairs (SFT: one example per entry); a batch is yielded
#   when full, a new epoch starts with an empty batch, and after a yield the iterator stops once its example
#   count (every example appended, those of dropped partial batches too) reaches n_examples;
# * the trainer builds both iterators without passing its seed (get_batch_iterator's default 0), evaluation
#   with split="test", n_examples=n_eval_examples, batch_size=eval_batch_size.
# random.seed(numpy int64) hashes the value on Python <= 3.10 (hash == value below 2**32) and is refused by
# 3.11, hence int() below.

ASSISTANT = "\n\nAssistant:"


def their_flat_data(rows: list[dict], name: str) -> list[list[int]]:
    """get_hh / get_tldr then flat_data: each entry's rows (1-based line numbers), entries in dict order."""
    data: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        if name == "hh":
            key = row["chosen"][:row["chosen"].rfind(ASSISTANT) + len(ASSISTANT)]
        else:
            key = str(index) + json.dumps(row["info"])
        data.setdefault(key, []).append(index + 1)
    return list(data.values())


def their_batches(flat_data: list[list[int]], *, batch_size: int, seed: int = 0, n_epochs: int | None = None,
                  n_examples: int | None = None, sft: bool = False, shuffle: bool = True):
    """get_batch_iterator's loop; yields batches of line numbers (SFT: an entry's first row stands for it)."""
    saved = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    permutation_seeds = iter(np.random.randint(0, 2 ** 32, size=1000000))
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    flat_data = [list(e) for e in flat_data]
    epoch_idx = example_idx = 0
    done = False
    while True:
        if n_epochs is not None and epoch_idx >= n_epochs:
            break
        if shuffle:
            state = random.getstate()
            random.seed(int(next(permutation_seeds)))
            random.shuffle(flat_data)
            random.setstate(state)
        batch = []
        for entry in flat_data:
            if done:
                break
            for line in (entry[:1] if sft else entry):
                if done:
                    break
                batch.append(line)
                example_idx += 1
                if len(batch) == batch_size:
                    yield batch
                    if n_examples is not None and example_idx >= n_examples:
                        done = True
                    batch = []
        if done:
            break
        epoch_idx += 1


def their_epoch_orders(flat_data, n_epochs: int, seed: int, sft: bool = False) -> list[list[int]]:
    """Each epoch's order: the iterator with batches of one."""
    per_epoch = len(flat_data) if sft else sum(map(len, flat_data))
    flat = [b[0] for b in their_batches(flat_data, batch_size=1, seed=seed, n_epochs=n_epochs, sft=sft)]
    return [flat[e * per_epoch:(e + 1) * per_epoch] for e in range(n_epochs)]


def _lines(data, indices) -> list[int]:
    return [int(data.items[i].source.rsplit(":", 1)[1]) for i in indices]


def _real_rows(name: str) -> tuple[bytes, list[dict]]:
    from _data_fixtures import REALDATA

    raw = (REALDATA / f"{name}_sample.jsonl").read_bytes()
    return raw, [json.loads(line) for line in raw.decode().splitlines()]


def _examples(name: str, path: Path, split: str, sft: bool):
    from caldpo.train.config import load_config
    from caldpo.train.schedule import Examples

    cfg = load_config([f"datasets=[{name}]", f"data.paths.{name}={path}", *(["loss=sft"] if sft else [])])
    return Examples(cfg, split, sft=sft, verbose=False)


@pytest.mark.parametrize("sft", [False, True])
def test_order_is_the_reference_iterators_on_real_hh_rows(tmp_path, sft):
    """Every genuine HH row (tests/data/realdata): the order of each of 4 epochs, at two seeds, and the
    evaluation examples, pair for pair against the iterator written out above. caldpo drops 2 identical pairs
    and splits 6 rows at another prompt; it trains the others in the reference's order, the 2 dropped rows
    keeping their entries' places in the shuffle. SFT: one example per entry, in the entries' order."""
    raw, rows = _real_rows("hh_rlhf")
    (tmp_path / "train.jsonl").write_bytes(raw)
    (tmp_path / "test.jsonl").write_bytes(raw)
    flat = their_flat_data(rows, "hh")
    assert len(flat) == 83 and len(rows) == 83
    for split in ("train", "test"):
        data = _examples("hh", tmp_path, split, sft)
        kept = _lines(data, range(len(data)))
        assert len(kept) == (83 if sft else 81)
        for seed in (0, 11):
            theirs = their_epoch_orders(flat, 4, seed, sft)
            order = data.epoch_order(seed)
            for epoch, their in enumerate(theirs):
                assert _lines(data, order(epoch)) == [line for line in their if line in kept], (split, seed, epoch)
            assert _lines(data, data.order(2, seed)) == [line for line in theirs[2] if line in kept]  # a fresh start
    # evaluation: the pairs caldpo has among the reference trainer's evaluation batches (ceil(40 / 16) of 16)
    theirs = [line for b in their_batches(flat, batch_size=16, n_examples=40, sft=sft) for line in b]
    assert len(theirs) == 48
    got = _lines(data, evaluation_indices(data.epoch_order(0), n_eval_examples=40, eval_batch_size=16))
    assert got == [line for line in theirs if line in kept] and (sft or len(got) < 48)


def test_order_is_the_reference_iterators_on_real_tldr_rows(tmp_path):
    """The genuine TL;DR comparison rows (their own split: test): every row is an entry of the reference's
    flat_data (get_tldr keys by row index); the 2 CNN/DM rows caldpo drops keep their places."""
    raw, rows = _real_rows("tldr_comparisons")
    (tmp_path / "tldr.jsonl").write_bytes(raw)
    data = _examples("tldr", tmp_path / "tldr.jsonl", "test", sft=False)
    kept = _lines(data, range(len(data)))
    assert len(rows) == 21 and len(kept) == 19
    flat = their_flat_data(rows, "tldr")
    for epoch, their in enumerate(their_epoch_orders(flat, 3, 0)):
        assert _lines(data, data.order(epoch, 0)) == [line for line in their if line in kept], epoch


def test_batches_steps_and_evaluation_are_the_reference_iterators(tmp_path):
    """The real HH rows less the two caldpo drops, so that both sides hold the same 81 pairs: training batches
    over 3 epochs (each epoch's partial batch dropped), the step count for n_examples within an epoch, at an
    epoch's dropped tail and across epochs, and the evaluation batches, batch for batch. A resume from any
    count of examples takes the same batches."""
    raw, rows = _real_rows("hh_rlhf")
    lines = [line for line in raw.decode().splitlines(keepends=True) if (r := json.loads(line))["chosen"] != r["rejected"]]
    (tmp_path / "train.jsonl").write_text("".join(lines))
    (tmp_path / "test.jsonl").write_text("".join(lines))
    flat = their_flat_data([json.loads(line) for line in lines], "hh")
    train = _examples("hh", tmp_path, "train", sft=False)
    assert len(train) == 81
    bs = 8
    sched = BatchSchedule(len(train), 0, batch_size=bs, groups=train.group_of, n_groups=train.n_groups,
                          ranks=train.rank_of)

    def ours(n_steps, start=0):
        return [_lines(train, sched.indices((start + s) * bs, bs)) for s in range(n_steps)]

    theirs = list(their_batches(flat, batch_size=bs, n_epochs=3))
    assert len(theirs) == sched.steps(3) == 30 and ours(30) == theirs
    assert ours(17, start=13) == theirs[13:]  # resumed at 104 examples, in the second epoch
    for n_examples in (8, 20, 80, 81, 88, 100, 170):  # 81: the count passes it among epoch 0's dropped tail
        theirs = list(their_batches(flat, batch_size=bs, n_examples=n_examples))
        assert sched.steps(1, n_examples) == len(theirs), n_examples
        assert ours(len(theirs)) == theirs, n_examples
    test = _examples("hh", tmp_path, "test", sft=False)
    for n_eval, ebs in ((40, 16), (48, 16), (1, 4), (81, 81)):
        theirs = [line for b in their_batches(flat, batch_size=ebs, n_examples=n_eval) for line in b]
        assert _lines(test, evaluation_indices(test.epoch_order(0), n_eval, ebs)) == theirs, (n_eval, ebs)
    # a split smaller than the reference's evaluation batches: evaluated whole, each example once
    assert sorted(evaluation_indices(test.epoch_order(0), 256, 32)) == list(range(81))


def test_epoch_seeds_are_numpys_draws_one_after_the_other():
    """Drawing fewer than the reference's 1,000,000 seeds gives their first values (legacy RandomState)."""
    from caldpo.train.batches import epoch_seeds

    np.random.seed(5)
    every = np.random.randint(0, 2 ** 32, size=1000000)
    assert epoch_seeds(5, 300) == [int(v) for v in every[:300]]
    with pytest.raises(ValueError, match="2\\*\\*32"):
        epoch_seeds(-1, 1)


def test_examples_fingerprint_follows_every_change_of_the_split(tmp_path):
    """``Examples.fingerprint`` (what a resume checkpoint records): equal for the same examples, different after
    rows are reordered, added, edited or removed, or a truncation that cuts examples differently; the other
    split's rows and the data's location do not enter it."""
    import shutil

    from caldpo.train.config import load_config
    from caldpo.train.data import SAMPLE_DIR
    from caldpo.train.schedule import Examples
    from caldpo.train.tiny import build_tokenizer

    data = tmp_path / "data"
    shutil.copytree(SAMPLE_DIR, data)
    train = data / "train.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    tok = build_tokenizer()

    def fp(*over: str, text: list[str] | None = None, where: Path = data) -> str:
        (where / "train.jsonl").write_text("".join(lines if text is None else text))
        cfg = load_config(["model=tiny", "datasets=[sample]", f"data.paths.sample={where}",
                           f"data.token_cache_dir={tmp_path / 'tokens'}", *over])
        return Examples(cfg, "train", sft=False, verbose=False, tokenizer=tok).fingerprint

    base = fp()
    assert len(base) == 64 and fp() == base
    edited = json.loads(lines[3])
    edited["rejected"] += " Really."
    changed = {"reordered": fp(text=lines[1:] + lines[:1]), "added": fp(text=lines + lines[:1]),
               "removed": fp(text=lines[:-1]), "edited": fp(text=lines[:3] + [json.dumps(edited) + "\n"] + lines[4:]),
               "max_length": fp("max_length=64", "max_prompt_length=32")}
    assert all(v != base for v in changed.values()) and len(set(changed.values())) == len(changed)
    assert fp("max_length=4096", "max_prompt_length=2048") == base  # lengths that cut nothing more: same examples
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    assert fp(where=moved) == base
    (data / "test.jsonl").write_text((data / "test.jsonl").read_text().splitlines(keepends=True)[0])
    assert fp() == base
