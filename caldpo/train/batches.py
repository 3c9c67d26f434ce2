"""Tokenization, truncation, label masking, collation and the reference iterator's example order.

This module owns how text becomes token ids (``encode_example``), the truncation rule
(``truncate_prompt``, shared by training and generation) and the load-time pass that
tokenizes every example once (``tokenize_dataset``).

Tokenization (``encode_example``):

* the sequence of a response is ``prompt + response`` tokenized as one text (no
  special tokens), and EOS is appended. Tokenizing the two separately would give a
  different text for tokenizers that prepend a dummy-prefix ``▁`` (SentencePiece:
  Llama-2, Mistral) or merge across the boundary;
* the prompt/response boundary comes from the offsets mapping: a token belongs to the
  prompt when it starts before the prompt's last character ends and ends at or before
  it (``start < len(prompt)`` and ``end <= len(prompt)``). A token that straddles the
  boundary belongs to the response (it is scored: it carries response characters).
  The prompt tokens of a pair are the leading tokens that are prompt tokens in both
  sequences and equal in both, so ``prompt_input_ids`` is one prefix shared by chosen
  and rejected. Tokenizers without offsets (slow ones) use the longest common prefix
  with the prompt tokenized alone;
* for byte-level BPE (GPT-NeoX/Pythia, GPT-2) and a response starting with a space,
  as in HH and TL;DR, the result is token for token the reference DPO code's
  ``tokenize_batch_element`` (which tokenizes the three texts separately).

Truncation (as ``tokenize_batch_element``):

* if prompt + the longer response exceeds ``max_length``, the prompt is cut to
  ``max_prompt_length`` tokens (``keep_start``: its first tokens, ``keep_end``: its last);
* if that is still too long, each response is cut to its first
  ``max_length - max_prompt_length`` tokens. The appended EOS is then cut as well, as
  in the reference code: such a response is scored as a prefix, not a finished text;
* labels are the input ids with every prompt position set to -100.

A text that already contains the EOS token is rejected (``EOSInTextError``), as the
reference code asserts: its EOS would be scored as a premature end of the response.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from .data import CountReport, DataError, PromptGroup

IGNORE_INDEX = -100
_CHUNK = 512  # texts per batched tokenizer call at load


class EOSInTextError(ValueError):
    """A prompt or response whose tokens already contain the EOS id."""


class Encoded(NamedTuple):
    """Token ids of one example after truncation, int32 arrays (compact for whole datasets).

    ``chosen``/``rejected`` are response ids (EOS appended unless truncation cut it);
    ``rejected`` is None for SFT. ``prompt_cut``/``response_cut``: whether truncation applied.
    """

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray | None
    prompt_cut: bool = False
    response_cut: bool = False


class Example(NamedTuple):
    """One training example: a preference pair, or (``rejected`` None) an SFT target.

    ``source`` names the row it came from (``"path:line"``, see ``data.Record.where``);
    ``tokens`` holds its ids once ``tokenize_dataset`` has run; ``order`` is (reference group, rank
    among that group's rows) within its dataset, what ``EpochOrder`` orders by (``data._Groups.slot``).
    """

    prompt: str
    chosen: str
    rejected: str | None
    truncation_mode: str
    source: str = ""
    tokens: Encoded | None = None
    order: tuple[int, int] | None = None


class ExampleError(DataError):
    """An example the tokenizer cannot turn into a training sequence; names its row."""

    def __init__(self, where: str, what: str, reason: str, hint: str = ""):
        ValueError.__init__(self, what)
        self.source, self.line, self.what, self.unit = where or "unknown row", None, what, "line"
        self.option, self.hint, self.reason = None, hint, reason

    def __str__(self) -> str:
        return f"{self.source}: {self.what}{'; ' + self.hint if self.hint else ''}"


# ----------------------------------------------------------------------------- tokenization


def _encode(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]] | None] | Exception]:
    """(ids, offsets or None) per text, no special tokens; an encode failure is returned, not raised.

    One batched call per chunk; a chunk that fails is retried text by text to find the culprit.
    """
    fast = bool(getattr(tokenizer, "is_fast", False))

    def call(batch):
        enc = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=fast)
        offs = enc["offset_mapping"] if fast else [None] * len(batch)
        return [(list(i), [tuple(o) for o in off] if off is not None else None)
                for i, off in zip(enc["input_ids"], offs)]

    out: list = []
    for s in range(0, len(texts), _CHUNK):
        batch = texts[s:s + _CHUNK]
        try:
            out.extend(call(batch))
        except Exception:  # noqa: BLE001 - any encode failure is reported per text below
            for t in batch:
                try:
                    out.extend(call([t]))
                except Exception as e:  # noqa: BLE001
                    out.append(e)
    return out


def _prompt_tokens(offsets: list[tuple[int, int]], n_chars: int) -> int:
    """Leading tokens that lie inside the first ``n_chars`` characters (the boundary rule above)."""
    n = 0
    for start, end in offsets:
        if not (start < n_chars and end <= n_chars):
            break
        n += 1
    return n


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    while n < limit and n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def truncate_prompt(ids: Sequence[int], limit: int, mode: str, keep_last: int = 0) -> list[int]:
    """The one prompt truncation rule (training and generation): at most ``limit`` tokens.

    ``keep_end`` keeps the last ``limit`` tokens; ``keep_start`` keeps the first ones and,
    with ``keep_last`` > 0, also the final ``keep_last`` tokens (the prompt's cue, e.g.
    ``"\\nTL;DR:"``), dropping tokens in between. Training uses ``keep_last=0`` (the
    reference code's rule); generation passes ``prompt_cue_tokens``.
    """
    if mode not in ("keep_start", "keep_end"):
        raise ValueError(f"unknown truncation mode {mode!r}; use 'keep_start' or 'keep_end'")
    ids = list(ids)
    if len(ids) <= limit:
        return ids
    if mode == "keep_end":
        return ids[len(ids) - limit:]
    keep_last = min(keep_last, limit)
    return ids[:limit - keep_last] + (ids[len(ids) - keep_last:] if keep_last else [])


def prompt_cue_tokens(prompt: str, offsets: list[tuple[int, int]] | None, limit: int) -> int:
    """Tokens of the prompt's final line (from its last newline on: ``"\\nTL;DR:"``, ``"\\nAssistant:"``).

    At most ``limit // 2`` tokens (a prompt without a newline keeps its last half). Without
    offsets (slow tokenizers): 0.
    """
    if offsets is None:
        return 0
    cue_start = prompt.rfind("\n")
    cue_start = 0 if cue_start < 0 else cue_start
    n = sum(1 for _, end in offsets if end > cue_start)
    return min(n, limit // 2)


def encode_prompt(prompt: str, tokenizer) -> tuple[list[int], list[tuple[int, int]] | None]:
    """(ids, offsets or None) of a prompt alone, as training tokenizes it (no special tokens)."""
    res = _encode(tokenizer, [prompt])[0]
    if isinstance(res, Exception):
        raise res
    return res


def _assemble(prompt: str, responses: dict[str, str], joint: dict[str, tuple], alone: tuple | None,
              tokenizer, max_length: int, max_prompt_length: int, truncation_mode: str) -> Encoded:
    """Split joint tokenizations at the prompt boundary, check EOS, append it, truncate."""
    eos = tokenizer.eos_token_id
    n_chars = len(prompt)
    seqs = {k: ids for k, (ids, _) in joint.items()}
    limits = []
    for ids, offsets in joint.values():
        if offsets is not None:
            limits.append(_prompt_tokens(offsets, n_chars))
        else:  # no offsets: the part shared with the prompt tokenized alone
            limits.append(_common_prefix(ids, alone[0], len(alone[0])))
    first = next(iter(seqs.values()))
    n = min(limits)
    for ids in seqs.values():
        n = _common_prefix(first, ids, n)
    for k, ids in seqs.items():
        if eos in ids:
            part = "prompt" if ids.index(eos) < n else f"{k} response"
            raise EOSInTextError(f"the {part} contains the EOS token {tokenizer.eos_token!r} (id {eos}), which "
                                 f"would end the sequence early: {(prompt + responses[k])[:120]!r}")
    prompt_ids = first[:n]
    resp = {k: ids[n:] + [eos] for k, ids in seqs.items()}
    longer = max(len(r) for r in resp.values())
    prompt_cut = response_cut = False
    if len(prompt_ids) + longer > max_length:
        prompt_cut = len(prompt_ids) > max_prompt_length
        prompt_ids = truncate_prompt(prompt_ids, max_prompt_length, truncation_mode)
    if len(prompt_ids) + longer > max_length:
        response_cut = True
        resp = {k: r[: max_length - max_prompt_length] for k, r in resp.items()}
    arr = lambda x: np.asarray(x, dtype=np.int32)  # noqa: E731
    return Encoded(arr(prompt_ids), arr(resp["chosen"]), arr(resp["rejected"]) if "rejected" in resp else None,
                   prompt_cut, response_cut)


def _check(tokenizer, truncation_mode: str) -> None:
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"unknown truncation mode {truncation_mode!r}; use 'keep_start' or 'keep_end'")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id")


def encode_example(prompt: str, chosen: str, rejected: str | None, tokenizer, *, max_length: int,
                   max_prompt_length: int, truncation_mode: str) -> Encoded:
    """Token ids of one example (module docstring: joint tokenization, boundary, truncation).

    Raises EOSInTextError if a text holds the EOS token, ValueError for a bad mode, and
    whatever the tokenizer raises for text it cannot encode (e.g. a lone surrogate).
    """
    _check(tokenizer, truncation_mode)
    responses = {"chosen": chosen} if rejected is None else {"chosen": chosen, "rejected": rejected}
    texts = [prompt + r for r in responses.values()]
    fast = bool(getattr(tokenizer, "is_fast", False))
    res = _encode(tokenizer, texts if fast else [*texts, prompt])
    for r in res:
        if isinstance(r, Exception):
            raise r
    joint = dict(zip(responses, res))
    return _assemble(prompt, responses, joint, None if fast else res[-1], tokenizer, max_length,
                     max_prompt_length, truncation_mode)


def example_dict(prompt: str, chosen: str, rejected: str | None, enc: Encoded) -> dict[str, Any]:
    """The tokenized example as lists: ``prompt``, ``chosen``/``rejected`` (prompt + response
    text), ``chosen_response_only``/``rejected_response_only``, ``prompt_input_ids``,
    ``prompt_attention_mask`` and ``{chosen,rejected}_{input_ids,attention_mask,labels}``
    (the rejected keys only for preference pairs)."""
    p = enc.prompt.tolist()
    n = len(p)
    out: dict[str, Any] = {"prompt": prompt, "prompt_input_ids": p, "prompt_attention_mask": [1] * n}
    for k, text, ids in (("chosen", chosen, enc.chosen), ("rejected", rejected, enc.rejected)):
        if ids is None:
            continue
        r = ids.tolist()
        seq = p + r
        out[k] = prompt + text
        out[f"{k}_response_only"] = text
        out[f"{k}_input_ids"] = seq
        out[f"{k}_attention_mask"] = [1] * len(seq)
        out[f"{k}_labels"] = [IGNORE_INDEX] * n + r
    return out


def tokenize_example(prompt: str, chosen: str, rejected: str | None, tokenizer, *, max_length: int,
                     max_prompt_length: int, truncation_mode: str) -> dict[str, Any]:
    """Token ids, attention masks and labels for one prompt and its one or two responses
    (``encode_example`` then ``example_dict``: see their docstrings for keys and errors)."""
    enc = encode_example(prompt, chosen, rejected, tokenizer, max_length=max_length,
                         max_prompt_length=max_prompt_length, truncation_mode=truncation_mode)
    return example_dict(prompt, chosen, rejected, enc)


def tokenized(ex: Example, tokenizer, *, max_length: int, max_prompt_length: int) -> dict[str, Any]:
    """``example_dict`` of an example, from its cached ``tokens`` when ``tokenize_dataset`` set them."""
    enc = ex.tokens
    if enc is None:
        enc = encode_example(ex.prompt, ex.chosen, ex.rejected, tokenizer, max_length=max_length,
                             max_prompt_length=max_prompt_length, truncation_mode=ex.truncation_mode)
    return example_dict(ex.prompt, ex.chosen, ex.rejected, enc)


# ----------------------------------------------------------------------------- load-time pass


@dataclass
class TokenReport(CountReport):
    """What tokenizing a dataset at load kept, dropped and skipped; printed after the data report."""

    dataset: str
    split: str
    max_length: int
    max_prompt_length: int
    examples: int = 0
    kept: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"tokens {self.dataset}/{self.split} (max_length={self.max_length}, max_prompt_length="
                f"{self.max_prompt_length}): {self.examples} examples -> {self.kept} kept; dropped: "
                f"{self.fmt(self.dropped)}; rows skipped: {self.fmt(self.skipped)}; prompts cut: {self.prompts_cut}, "
                f"responses cut: {self.responses_cut}")


def tokenize_dataset(examples: Sequence[Example], tokenizer, *, max_length: int, max_prompt_length: int,
                     on_error: str = "raise", dataset: str = "", split: str = "") -> tuple[list[Example], TokenReport]:
    """Tokenize every example once, at load: the kept examples (``tokens`` set) and a report.

    * a pair whose chosen and rejected ids are identical after truncation carries no
      preference: dropped and counted (``identical_after_truncation``);
    * text the tokenizer cannot encode (e.g. a lone surrogate) and text holding the EOS
      token raise ``ExampleError`` naming the row (``Example.source``), or with
      ``on_error="skip"`` are skipped and counted (``untokenizable``, ``eos_in_text``).
    """
    report = TokenReport(dataset, split, max_length, max_prompt_length, examples=len(examples))
    if not examples:
        return [], report
    tokenizer_eos = tokenizer.eos_token_id
    if tokenizer_eos is None:
        raise ValueError("the tokenizer has no eos_token_id")
    fast = bool(getattr(tokenizer, "is_fast", False))
    texts: list[str] = []
    for ex in examples:
        _check(tokenizer, ex.truncation_mode)
        texts.append(ex.prompt + ex.chosen)
        if ex.rejected is not None:
            texts.append(ex.prompt + ex.rejected)
        if not fast:
            texts.append(ex.prompt)
    encoded = iter(_encode(tokenizer, texts))

    def fail(ex: Example, reason: str, what: str) -> None:
        if on_error != "skip":
            raise ExampleError(ex.source, what, reason, "fix the row, or set data.on_error=skip to skip such rows")
        report.skip(reason)

    kept: list[Example] = []
    for ex in examples:
        responses = {"chosen": ex.chosen} if ex.rejected is None else {"chosen": ex.chosen, "rejected": ex.rejected}
        res = [next(encoded) for _ in responses]
        alone = None if fast else next(encoded)
        bad = next((r for r in (*res, alone) if isinstance(r, Exception)), None)
        if bad is not None:
            fail(ex, "untokenizable", f"the tokenizer cannot encode this text ({type(bad).__name__}: {bad})")
            continue
        try:
            enc = _assemble(ex.prompt, responses, dict(zip(responses, res)), alone, tokenizer, max_length,
                            max_prompt_length, ex.truncation_mode)
        except EOSInTextError as e:
            fail(ex, "eos_in_text", str(e))
            continue
        if enc.rejected is not None and np.array_equal(enc.chosen, enc.rejected):
            report.add(report.dropped, "identical_after_truncation")
            continue
        report.prompts_cut += enc.prompt_cut
        report.responses_cut += enc.response_cut
        kept.append(ex._replace(tokens=enc))
    report.kept = len(kept)
    return kept, report


# ----------------------------------------------------------------------------- batches


def _pad(seqs: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            if left:
                out[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            else:
                out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(examples: list[dict], pad_token_id: int) -> dict[str, Any]:
    """Pad token lists into LongTensors; other fields become lists.

    ``*_input_ids`` pad with ``pad_token_id``, ``*_attention_mask`` with 0 and
    ``*_labels`` with -100, on the right, except ``prompt_*`` which is padded on the left
    (as in the reference collate) so that generation can continue every prompt at once.
    """
    batch: dict[str, Any] = {}
    for k in examples[0]:
        values = [ex[k] for ex in examples]
        if k.endswith("_input_ids"):
            batch[k] = _pad(values, pad_token_id, left=k.startswith("prompt"))
        elif k.endswith("_attention_mask"):
            batch[k] = _pad(values, 0, left=k.startswith("prompt"))
        elif k.endswith("_labels"):
            batch[k] = _pad(values, IGNORE_INDEX, left=k.startswith("prompt"))
        else:
            batch[k] = values
    return batch


def flatten(groups: dict[str, PromptGroup], *, sft: bool) -> list[Example]:
    """Training examples in group order: SFT, one per prompt with its SFT target;
    preference, one per pair. Each names its source row (``pair_sources``/``sft_source``) and
    its place in the reference order (``pair_order``/``sft_order``; groups built without them:
    each group its own reference group, its pairs ranked in their order)."""
    out: list[Example] = []
    for k, g in enumerate(groups.values()):
        if sft:
            order = getattr(g, "sft_order", None) or (k, 0)
            out.append(Example(g.prompt, g.sft_target, None, g.truncation_mode, getattr(g, "sft_source", ""),
                               order=order))
            continue
        sources = getattr(g, "pair_sources", None) or [""] * len(g.pairs)
        orders = getattr(g, "pair_order", None) or [(k, m) for m in range(len(g.pairs))]
        out.extend(Example(g.prompt, g.responses[i], g.responses[j], g.truncation_mode, src, order=o)
                   for (i, j), src, o in zip(g.pairs, sources, orders))
    return out


def epoch_seeds(seed: int, n_epochs: int) -> list[int]:
    """The reference iterator's shuffle seed of each of the first ``n_epochs`` epochs.

    ``preference_datasets.get_batch_iterator`` seeds numpy's global RandomState with its ``seed``
    and draws ``np.random.randint(0, 2**32, size=1000000)`` before its first epoch; epoch e seeds
    Python's ``random`` with the e-th value. A legacy RandomState draws these values one after the
    other, so the first ``n_epochs`` of them are drawn here. The reference passes numpy int64s to
    ``random.seed``, which Python <= 3.10 seeds by their hash: for 0 <= v < 2**32 that is ``v``
    itself (Python 3.11 refuses the type), so ``int(v)`` is the same seed.
    """
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed={seed}: the data order seeds numpy's RandomState, which takes 0 <= seed < 2**32")
    draws = np.random.RandomState(seed).randint(0, 2 ** 32, size=n_epochs, dtype=np.int64)
    return [int(v) for v in draws]


class EpochOrder:
    """The order of ``n`` examples epoch after epoch, as the reference iterator yields them.

    ``preference_datasets.get_batch_iterator`` (the original DPO repository's, forked by the Cal-DPO
    authors) keeps one list ``flat_data`` of per-prompt entries and, before each epoch, shuffles
    that same list in place with ``random.shuffle`` under ``random.seed(epoch_seeds(seed)[e])``: the
    shuffles are cumulative (epoch e's order is epoch e-1's, shuffled again). It then walks each
    entry's pairs in turn (SFT: one example per entry). ``shuffle=False``: the entries in their order.

    groups: each example's reference group (``0 <= g < n_groups``), what ``flat_data`` holds one entry
    of (``data._Groups.slot``); None: every example its own. ranks: each example's rank among its
    entry's rows (default: their index order). sizes: how many examples the reference walks per entry,
    rows caldpo dropped included (default: the examples here); a group whose examples were all
    dropped keeps its place in the shuffle. Epochs asked in increasing order cost one shuffle each;
    an earlier epoch starts again from the loaded order.
    """

    def __init__(self, n: int, seed: int, *, groups: Sequence[int] | None = None, n_groups: int | None = None,
                 ranks: Sequence[int] | None = None, sizes: Sequence[int] | None = None, shuffle: bool = True):
        if groups is None:
            groups, n_groups = range(n), n
        elif n_groups is None:
            n_groups = len(sizes) if sizes is not None else max(groups, default=-1) + 1
        members: list[list[int]] = [[] for _ in range(n_groups)]
        for i in (range(n) if ranks is None else sorted(range(n), key=ranks.__getitem__)):
            members[groups[i]].append(i)
        self.members, self.seed, self.shuffle = members, seed, shuffle
        self.ranks = ranks
        self.sizes = list(sizes) if sizes is not None else [len(m) for m in members]
        if len(self.sizes) != n_groups:
            raise ValueError(f"sizes: {len(self.sizes)} entries for {n_groups} groups")
        epoch_seeds(seed, 0)  # the seed's range, checked now
        self._seeds: list[int] = []
        self._epoch, self._groups = -1, list(range(n_groups))

    def _shuffled(self, epoch: int) -> list[int]:
        if epoch < 0:
            raise ValueError(f"epoch {epoch} < 0")
        if self.shuffle:
            if epoch < self._epoch:
                self._epoch, self._groups = -1, list(range(len(self.members)))
            if len(self._seeds) <= epoch:
                self._seeds = epoch_seeds(self.seed, max(epoch + 1, 2 * len(self._seeds)))
            while self._epoch < epoch:
                self._epoch += 1
                random.Random(self._seeds[self._epoch]).shuffle(self._groups)
        return self._groups

    def __call__(self, epoch: int) -> list[int]:
        """Example indices in ``epoch``'s order (0-based epochs)."""
        return [i for g in self._shuffled(epoch) for i in self.members[g]]

    def positions(self, epoch: int) -> list[tuple[int, int]]:
        """``(example, its position in the reference's walk of the epoch)`` in ``epoch``'s order: the
        reference walks ``sizes[g]`` rows per entry, dropped ones included."""
        out, start = [], 0
        for g in self._shuffled(epoch):
            for k, i in enumerate(self.members[g]):
                out.append((i, start + (self.ranks[i] if self.ranks is not None else k)))
            start += self.sizes[g]
        return out

    @property
    def reference_examples(self) -> int:
        """Examples the reference walks per epoch (``sum(sizes)``)."""
        return sum(self.sizes)


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool = True, groups: Sequence[int] | None = None,
                n_groups: int | None = None, ranks: Sequence[int] | None = None) -> list[int]:
    """The order of ``n`` examples in ``epoch``: ``EpochOrder(...)(epoch)`` (the reference iterator's).

    Deterministic across runs and processes, so a resumed run can skip to its position.
    """
    return EpochOrder(n, seed, groups=groups, n_groups=n_groups, ranks=ranks, shuffle=shuffle)(epoch)


def tokenize_all(examples: Sequence[Example], tokenizer, *, max_length: int,
                 max_prompt_length: int) -> list[dict[str, Any]]:
    """``tokenize_example`` for each flattened example (convenience for small datasets and tests)."""
    return [tokenize_example(ex.prompt, ex.chosen, ex.rejected, tokenizer, max_length=max_length,
                             max_prompt_length=max_prompt_length, truncation_mode=ex.truncation_mode)
            for ex in examples]
