"""From examples to micro-batches: the examples of a split, their order, and each micro-batch's layout.

One step = ``batch_size`` examples in global order; each rank takes its contiguous slice
and splits it into ``gradient_accumulation_steps`` micro-batches. The order is a
deterministic permutation per epoch (``batches.epoch_order``: prompt groups shuffled, each
group's pairs together, as the reference iterator), so the data position is a
single count of examples consumed and resume is exact. A micro-batch is laid out once,
in the run's layout (``layout.py``), and the policy and the reference both run that form.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from .batches import Example, collate, epoch_order, flatten, tokenize_dataset, tokenized
from .config import ConfigError
from .data import load_dataset
from .layout import pack
from .metrics import token_work


class Examples:
    """The examples of all datasets, one split (``batches.Example``, in dataset order).

    With a ``tokenizer`` every example is tokenized here, once, at load
    (``batches.tokenize_dataset``): its ids are cached on the example, pairs identical
    after truncation are dropped and counted, and text the tokenizer cannot encode or that
    holds the EOS token stops the run naming its file and line (or, with
    ``data.on_error=skip``, is skipped and counted). Each dataset prints its data report
    and its token report. Without a tokenizer (generation) only the texts are loaded.
    Raises ConfigError when the split ends up empty; DataError (data.py) for bad rows.
    """

    def __init__(self, cfg: DictConfig, split: str, sft: bool, verbose: bool, tokenizer=None):
        self.items: list[Example] = []
        self.group_of: list[int] = []  # each example's prompt group, numbered over all datasets in load order
        self.n_groups = 0
        self.reports = []
        self.token_reports = []
        for name in cfg.datasets:
            groups, report = load_dataset(name, split, sft=sft, path=(cfg.data.paths or {}).get(name),
                                          on_error=cfg.data.on_error, cache_dir=cfg.data.cache_dir,
                                          held_out=cfg.data.held_out)
            if verbose:
                print(str(report), flush=True)
            self.reports.append(report)
            items = flatten(groups, sft=sft)
            if tokenizer is not None:
                items, tok_report = tokenize_dataset(
                    items, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                    on_error=cfg.data.on_error, dataset=name, split=split)
                if verbose:
                    print(str(tok_report), flush=True)
                self.token_reports.append(tok_report)
            group = {g.prompt: self.n_groups + k for k, g in enumerate(groups.values())}
            self.group_of.extend(group[it.prompt] for it in items)
            self.n_groups += len(groups)
            self.items.extend(items)
        if not self.items:
            raise ConfigError(f"datasets={list(cfg.datasets)}: no {split} examples")

    def __len__(self) -> int:
        return len(self.items)

    def order(self, epoch: int, seed: int) -> list[int]:
        """This split's order in ``epoch``: prompt groups shuffled, each group's pairs together
        (``batches.epoch_order``, the reference iterator's order)."""
        return epoch_order(len(self.items), epoch, seed, groups=self.group_of, n_groups=self.n_groups)


class BatchSchedule:
    """Which examples each step and each micro-batch of this rank takes.

    n: training examples; seed: the run's seed; groups, n_groups: each example's prompt group
    (``Examples.group_of``, ``Examples.n_groups``; None: every example its own group). Epoch e's
    order is ``batches.epoch_order(n, e, seed, groups=groups, n_groups=n_groups)``.
    batch_size: examples per optimizer step. Each epoch yields its full batches only and drops the
    last ``n % batch_size`` examples of its order, as the reference code's batch iterator starts
    every epoch with an empty batch; ``epoch_examples`` is what an epoch trains on.
    Raises ValueError when ``n < batch_size`` (no epoch holds one batch).
    """

    def __init__(self, n: int, seed: int, *, batch_size: int = 1, rank: int = 0, world: int = 1,
                 accumulation_steps: int = 1, groups: list[int] | None = None, n_groups: int | None = None):
        if n < batch_size:
            raise ValueError(f"{n} training examples cannot fill one batch of {batch_size}")
        self.n, self.seed, self.batch_size = n, seed, batch_size
        self.epoch_examples = n - n % batch_size
        self.rank, self.world, self.accumulation_steps = rank, world, accumulation_steps
        self.groups, self.n_groups = groups, n_groups
        self._epoch, self._order = None, None

    def indices(self, start: int, count: int) -> list[int]:
        """Example indices at training positions [start, start + count) (a position counts the examples
        trained before it), epochs following each other, each ``epoch_examples`` long."""
        out, pos = [], start
        while len(out) < count:
            epoch, offset = divmod(pos, self.epoch_examples)
            if self._epoch != epoch:
                self._order = epoch_order(self.n, epoch, self.seed, groups=self.groups, n_groups=self.n_groups)
                self._epoch = epoch
            take = min(count - len(out), self.epoch_examples - offset)
            out.extend(self._order[offset:offset + take])
            pos += take
        return out

    def micro_batches(self, indices: list[int]) -> list[list[int]]:
        """This rank's contiguous share of a step's ``indices``, cut into ``accumulation_steps`` chunks."""
        per_rank = len(indices) // self.world
        mine = indices[self.rank * per_rank:(self.rank + 1) * per_rank]
        size = per_rank // self.accumulation_steps
        return [mine[i * size:(i + 1) * size] for i in range(self.accumulation_steps)]


class Collator:
    """Builds a micro-batch (a dict) from examples, in the run's layout.

    layout ``padded``: ``batches.collate``'s padded tensors (``{chosen,rejected}_{input_ids,
    attention_mask,labels}`` [B, T] int64, ...). ``packed`` / ``prefix_shared``: only
    ``"packed"``, a ``layout.PackedBatch`` (no padded copy is built). Both carry
    ``n_pairs`` (B), ``example_index`` and ``split`` (for the reference cache), ``tokens``
    (non-padding tokens of chosen and rejected, the prompt counted in each: what tokens/s
    counts in every layout), ``sequences`` (B or 2B), ``backbone_tokens`` (what the
    backbone runs: padding included, a shared prompt once) and the work MFU counts, the same in
    every layout (``metrics.token_work``): ``useful_tokens`` (each pair's shared prefix once, no
    padding), ``attention_context`` (the causal context those tokens attend to, summed) and
    ``scored_tokens`` (the tokens the head scores).

    row_tokens: ``layout.pack``'s row capacity (0: one row per micro-batch, for block masks and
    segments). segments: packed rows run as attention segments (``layout.pack(segments=True)``).
    """

    def __init__(self, tokenizer, *, max_length: int, max_prompt_length: int, layout: str, sft: bool,
                 row_tokens: int | None = None, segments: bool = False):
        self.tokenizer = tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.layout, self.sft, self.row_tokens, self.segments = layout, sft, row_tokens, segments
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, items: list[Example], example_index: list[int], split: str) -> dict[str, Any]:
        examples = [tokenized(it, self.tokenizer, max_length=self.max_length,
                              max_prompt_length=self.max_prompt_length) for it in items]
        sides = ("chosen",) if self.sft else ("chosen", "rejected")
        lengths = [[len(ex[f"{s}_input_ids"]) for ex in examples] for s in sides]
        batch: dict[str, Any] = {"n_pairs": len(examples), "example_index": example_index, "split": split,
                                 "pad_token_id": self.pad_token_id, "tokens": sum(map(sum, lengths)),
                                 "sequences": sum(map(len, lengths))}
        batch.update(token_work(examples, sft=self.sft))
        if self.layout == "padded":  # chosen over rejected, both padded to the wider of the two
            batch.update(collate(examples, self.pad_token_id))
            batch["backbone_tokens"] = batch["sequences"] * max(max(ls) for ls in lengths)
        else:  # the policy and the reference both run this packed form
            batch["packed"] = pack(examples, self.layout, sft=self.sft, pad_token_id=self.pad_token_id,
                                   row_tokens=self.row_tokens, segments=self.segments)
            batch["backbone_tokens"] = batch["packed"].n_tokens
        return batch
