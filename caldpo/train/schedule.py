"""From examples to micro-batches: the examples of a split, their order, and each micro-batch's layout.

One step = ``batch_size`` examples in global order; each rank takes its contiguous slice
and splits it into ``gradient_accumulation_steps`` micro-batches. The order is the reference
iterator's (``preference_datasets.get_batch_iterator``; ``batches.EpochOrder``: its per-prompt
entries shuffled cumulatively, epoch after epoch, with seeds drawn from numpy, each entry's pairs
together), and so are the batch boundaries (``BatchSchedule``) and the evaluation examples
(``evaluation_indices``). Each epoch's order is a function of the seed and the epoch, so the data
position is a single count of examples consumed and resume is exact. A micro-batch is laid out
once, in the run's layout (``layout.py``), and the policy and the reference both run that form.
"""
from __future__ import annotations

import hashlib
from typing import Any

from omegaconf import DictConfig

from .batches import EpochOrder, Example, collate, tokenized
from .config import ConfigError
from .data import local_source
from .layout import pack
from .metrics import token_work
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

    ``group_of``, ``rank_of``: each example's reference entry (numbered over all datasets in load
    order) and its rank there; ``group_sizes``: each entry's rows, dropped ones included;
    ``n_groups``: the entries: what ``batches.EpochOrder`` orders by (the reference iterator's order).

    process: the trainer's ``distributed.Process`` (None: one process). Raises ConfigError when the
    split ends up empty or the ranks hold different examples; DataError (data.py) for bad rows.
    """

    def __init__(self, cfg: DictConfig, split: str, sft: bool, verbose: bool, tokenizer=None, process=None):
        self.tables: list[SplitTable] = []
        self.files: dict[str, list[str]] = {}  # dataset -> the files its examples were read from, in order
        self.group_of: list[int] = []
        self.rank_of: list[int] = []
        self.group_sizes: list[int] = []
        self.n_groups = 0
        self.reports = []
        self.token_reports = []
        for name in cfg.datasets:
            spec = SplitSpec.from_config(cfg, name, split, sft)
            table = load_split(spec, tokenizer, cache_dir=cfg.data.get("token_cache_dir"), process=process,
                               verbose=verbose)
            self.tables.append(table)
            self.reports.append(table.data_report)
            if tokenizer is not None:
                self.token_reports.append(table.token_report)
            self.group_of.extend((table.order[:, 0].astype("int64") + self.n_groups).tolist())
            # SFT: the reference takes one example per entry, where the entry stands
            self.rank_of.extend([0] * len(table) if sft else table.order[:, 1].tolist())
            sizes = table.order_sizes
            self.group_sizes.extend([1] * len(sizes) if sft else sizes.tolist())
            self.n_groups += len(sizes)
            local = local_source(name, split, spec.path)
            self.files[name] = [str(f) for f in local[0].files] if local is not None else [table.data_report.source]
        self.items: ExampleList = ExampleList(self.tables)
        if not len(self.items):
            raise ConfigError(f"datasets={list(cfg.datasets)}: no {split} examples")

    def __len__(self) -> int:
        return len(self.items)

    def epoch_order(self, seed: int) -> EpochOrder:
        """This split's order, epoch after epoch (``batches.EpochOrder``: the reference iterator's)."""
        return EpochOrder(len(self.items), seed, groups=self.group_of, n_groups=self.n_groups, ranks=self.rank_of,
                          sizes=self.group_sizes)

    @property
    def fingerprint(self) -> str:
        """Hex sha256 naming this split's examples (what a resume checkpoint records): the datasets in
        order and each one's table fingerprint, which hashes everything an example is (prompt, chosen
        and rejected texts, their token ids after truncation and the cut flags, each example's prompt
        group and place in the reference order, the truncation mode, sft) and nothing about where it
        came from (file paths, lines, reports). Equal fingerprints mean the same examples in the same
        order with the same ids; any change of data content, tokenizer, lengths or rules that changes
        an example changes it."""
        h = hashlib.sha256()
        for t in self.tables:
            h.update(f"{t.dataset}:{t.fingerprint};".encode())
        return h.hexdigest()

    @property
    def sources(self) -> str:
        """Where this split's examples were read, for messages: ``<dataset>: <file>, <file> (and N more)``."""
        return "; ".join(f"{name}: {', '.join(fs[:3])}" + (f" (and {len(fs) - 3} more)" if len(fs) > 3 else "")
                         for name, fs in self.files.items())

    def order(self, epoch: int, seed: int) -> list[int]:
        """This split's order in ``epoch`` (``epoch_order``)."""
        return self.epoch_order(seed)(epoch)


def evaluation_indices(order: EpochOrder, n_eval_examples: int, eval_batch_size: int) -> list[int]:
    """The evaluation examples: those of the reference trainer's, from the test split's ``order``
    (``Examples.epoch_order(seed)``), in its first epoch's order.

    The reference trainer evaluates what ``get_batch_iterator(split="test", shuffle=True,
    n_examples=n_eval_examples, batch_size=eval_batch_size)`` yields: whole batches of the first
    epoch's order until ``n_eval_examples`` are reached, so its first ``ceil(n_eval_examples /
    eval_batch_size)`` batches. caldpo evaluates the pairs it kept among those (a pair it dropped at
    load is not replaced, so the set is the reference's less the dropped pairs). A split whose first
    epoch holds fewer is evaluated whole, each example once (the reference iterator would go on into
    a reshuffled second epoch and evaluate some examples twice).
    """
    n = -(-n_eval_examples // eval_batch_size) * eval_batch_size
    if n >= order.reference_examples:
        return order(0)
    return [i for i, pos in order.positions(0) if pos < n]


class BatchSchedule:
    """Which examples each step and each micro-batch of this rank takes.

    n: training examples; seed: the run's seed; groups, n_groups, ranks: each example's reference
    group and its rank there (``Examples.group_of``, ``n_groups``, ``rank_of``; None: every example
    its own group). Epoch e's order is ``batches.EpochOrder(n, seed, groups=..., ...)(e)``: the
    reference's, less the pairs dropped at load.
    batch_size: examples per optimizer step. Each epoch yields its full batches only and drops the
    last ``n % batch_size`` examples of its order, as ``get_batch_iterator`` starts every epoch with
    an empty batch; ``epoch_examples`` is what an epoch trains on. ``steps`` is how many batches
    the reference iterator yields before it stops.
    Raises ValueError when ``n < batch_size`` (no epoch holds one batch).
    """

    def __init__(self, n: int, seed: int, *, batch_size: int = 1, rank: int = 0, world: int = 1,
                 accumulation_steps: int = 1, groups: list[int] | None = None, n_groups: int | None = None,
                 ranks: list[int] | None = None):
        if n < batch_size:
            raise ValueError(f"{n} training examples cannot fill one batch of {batch_size}")
        self.n, self.seed, self.batch_size = n, seed, batch_size
        self.epoch_examples = n - n % batch_size
        self.rank, self.world, self.accumulation_steps = rank, world, accumulation_steps
        self._orders = EpochOrder(n, seed, groups=groups, n_groups=n_groups, ranks=ranks)
        self._epoch, self._order = None, None

    def steps(self, n_epochs: int, n_examples: int | None = None) -> int:
        """Optimizer steps of a run: ``n_epochs`` epochs of ``n // batch_size`` batches, or with
        ``n_examples`` (which caldpo lets override ``n_epochs``) the batches ``get_batch_iterator``
        yields until its example count reaches ``n_examples``. That count is checked after each
        batch and includes the examples of the partial batches dropped at earlier epochs' ends, so
        the run stops at the first batch boundary at or past ``n_examples`` (100 examples in batches
        of 64 train 2 steps)."""
        per_epoch = self.n // self.batch_size
        if n_examples is None:
            return n_epochs * per_epoch
        # batch j (1-based) of epoch e ends at count e * n + j * batch_size: the first epoch whose last
        # batch reaches n_examples, then the first batch of it that does
        full = self.batch_size * per_epoch
        epoch = max(0, -(-(n_examples - full) // self.n))
        return epoch * per_epoch + max(1, -(-(n_examples - epoch * self.n) // self.batch_size))

    def indices(self, start: int, count: int) -> list[int]:
        """Example indices at training positions [start, start + count) (a position counts the examples
        trained before it), epochs following each other, each ``epoch_examples`` long."""
        out, pos = [], start
        while len(out) < count:
            epoch, offset = divmod(pos, self.epoch_examples)
            if self._epoch != epoch:
                self._order, self._epoch = self._orders(epoch), epoch
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
