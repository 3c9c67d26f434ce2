"""From examples to micro-batches: the examples of a split, their order, and each micro-batch's layout.

One step = ``batch_size`` examples in global order; each rank takes its contiguous slice
and splits it into ``gradient_accumulation_steps`` micro-batches. The order is a
deterministic permutation per epoch (``batches.epoch_order``: prompt groups shuffled, each
group's pairs together, as the reference iterator), so the data position is a
single count of examples consumed and resume is exact. A micro-batch is laid out once,
in the run's layout (``layout.py``), and the policy and the reference both run that form.
"""
from __future__ import annotations

import hashlib
from typing import Any

from omegaconf import DictConfig

from .batches import Example, collate, epoch_order, tokenized
from .config import ConfigError
from .layout import pack
from .tokens import ExampleList, SplitSpec, SplitTable, load_split


class Examples:
    """The examples of all datasets, one split, in dataset order (``items[i]``: a ``batches.Example``).

    Each dataset's split is a ``tokens.SplitTable``: token ids and the per-example integers in flat
    arrays memory-mapped from the token cache (``data.token_cache_dir``), built once per content key
    (``caldpo.train.tokens``: rows loaded, tokenized by ``batches.tokenize_examples``, written
    atomically; under torchrun rank 0 builds and the other ranks map its file). With a
    ``tokenizer``, pairs identical after truncation are dropped and counted, and text the tokenizer
    cannot encode or that holds the EOS token stops the run naming its file and line (or, with
    ``data.on_error=skip``, is skipped and counted); without one (generation) only the texts are
    kept. ``items[i]`` builds its ``Example`` from the arrays on access (``tokens`` are views of the
    ids). When ``verbose`` each dataset prints its data report and its token report, the same on a
    cold start and from the cache, with progress bars on a terminal while building.

    process: the trainer's ``distributed.Process`` (None: one process). Raises ConfigError when the
    split ends up empty or the ranks hold different examples; DataError (data.py) for bad rows.
    """

    def __init__(self, cfg: DictConfig, split: str, sft: bool, verbose: bool, tokenizer=None, process=None):
        self.tables: list[SplitTable] = []
        self.group_of: list[int] = []  # each example's prompt group, numbered over all datasets in load order
        self.n_groups = 0
        self.reports = []
        self.token_reports = []
        for name in cfg.datasets:
            table = load_split(SplitSpec.from_config(cfg, name, split, sft), tokenizer,
                               cache_dir=cfg.data.get("token_cache_dir"), process=process, verbose=verbose)
            self.tables.append(table)
            self.reports.append(table.data_report)
            if tokenizer is not None:
                self.token_reports.append(table.token_report)
            self.group_of.extend((table.group.astype("int64") + self.n_groups).tolist())
            self.n_groups += table.n_groups
        self.items: ExampleList = ExampleList(self.tables)
        if not len(self.items):
            raise ConfigError(f"datasets={list(cfg.datasets)}: no {split} examples")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def fingerprint(self) -> str:
        """Hex sha256 naming this split's examples: the datasets in order and each one's table
        fingerprint, which hashes everything an example is (prompt, chosen and rejected texts, their
        token ids after truncation and the cut flags, each example's prompt group and the number of
        groups, the truncation mode, sft) and nothing about where it came from (file paths, lines,
        reports). Equal fingerprints mean the same examples in the same order with the same ids; any
        change of data content, tokenizer, lengths or rules that changes an example changes it."""
        h = hashlib.sha256()
        for t in self.tables:
            h.update(f"{t.dataset}:{t.fingerprint};".encode())
        return h.hexdigest()

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
    counts in every layout), ``sequences`` (B or 2B) and ``backbone_tokens`` (what the
    backbone runs: padding included, a shared prompt once).

    row_tokens: ``layout.pack``'s row capacity (0: one row per micro-batch, for block masks).
    """

    def __init__(self, tokenizer, *, max_length: int, max_prompt_length: int, layout: str, sft: bool,
                 row_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.layout, self.sft, self.row_tokens = layout, sft, row_tokens
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, items: list[Example], example_index: list[int], split: str) -> dict[str, Any]:
        examples = [tokenized(it, self.tokenizer, max_length=self.max_length,
                              max_prompt_length=self.max_prompt_length) for it in items]
        sides = ("chosen",) if self.sft else ("chosen", "rejected")
        lengths = [[len(ex[f"{s}_input_ids"]) for ex in examples] for s in sides]
        batch: dict[str, Any] = {"n_pairs": len(examples), "example_index": example_index, "split": split,
                                 "pad_token_id": self.pad_token_id, "tokens": sum(map(sum, lengths)),
                                 "sequences": sum(map(len, lengths))}
        if self.layout == "padded":  # chosen over rejected, both padded to the wider of the two
            batch.update(collate(examples, self.pad_token_id))
            batch["backbone_tokens"] = batch["sequences"] * max(max(ls) for ls in lengths)
        else:  # the policy and the reference both run this packed form
            batch["packed"] = pack(examples, self.layout, sft=self.sft, pad_token_id=self.pad_token_id,
                                   row_tokens=self.row_tokens)
            batch["backbone_tokens"] = batch["packed"].n_tokens
        return batch
