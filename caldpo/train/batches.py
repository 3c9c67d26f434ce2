"""Tokenization, truncation, label masking, collation and the reference iterator's example order.

This module owns how text becomes token ids (``encode_example``; ``TextEncoder`` for many texts
per call, into flat arrays), the truncation rule (``prompt_span``/``truncate_prompt``, shared by
training and generation) and the load-time pass that tokenizes every example once
(``tokenize_examples``; ``caldpo.train.tokens`` keeps its output on disk).

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
  ``tokenize_batch_element`` (which tokenizes the three texts separately);
* at load, for a tokenizer that ``splits_at_cuts`` (byte-level BPE with GPT-2's regex), the part
  of each prompt before the whitespace ahead of its last line (``cut_point``) is encoded once for
  all its responses and the rest of each text apart: the same ids as the whole text (why:
  ``splits_at_cuts``), checked against the ordinary call on the first text of every call.

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
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np

from .data import CountReport, DataError, PromptGroup

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
_CHUNK = 256  # examples per batched tokenizer call at load (two chunks in flight: their Encodings bound the memory)


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


class EncodedTexts(NamedTuple):
    """Many texts tokenized at once, in flat arrays (no Python object per token).

    ``ids``: int32 [total tokens], the texts' ids one after the other; ``bounds``: int64 [n + 1], text i
    is ``ids[bounds[i]:bounds[i + 1]]``; ``prompt_tokens``: int64 [n], the leading tokens of text i that
    are its prompt's (the boundary rule, ``prompt_token_counts``); ``first_eos``: int64 [n], the position
    of text i's first EOS id (-1: none, or the tokenizer has no EOS); ``errors``: text index -> what the
    tokenizer raised for that text (its span is empty).
    """

    ids: np.ndarray
    bounds: np.ndarray
    prompt_tokens: np.ndarray
    first_eos: np.ndarray
    errors: dict[int, Exception]

    def text(self, i: int) -> np.ndarray:
        return self.ids[self.bounds[i]:self.bounds[i + 1]]


def prompt_token_counts(offsets: np.ndarray, lengths: np.ndarray, n_chars: np.ndarray) -> np.ndarray:
    """The boundary rule for many texts: per text, its leading tokens that start before its prompt's
    ``n_chars`` characters end and end at or before that (``start < n_chars and end <= n_chars``).

    offsets: int [total tokens, 2] character (start, end) of each token, texts one after the other;
    lengths: int [n] tokens per text; n_chars: int [n] prompt characters per text. Returns int64 [n].
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = lengths.copy()
    if not len(offsets):
        return counts
    per_token = np.repeat(np.asarray(n_chars, dtype=np.int64), lengths)
    outside = np.flatnonzero((offsets[:, 0] >= per_token) | (offsets[:, 1] > per_token))
    if outside.size:
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        text = np.repeat(np.arange(len(lengths)), lengths)[outside]
        first = np.concatenate(([True], text[1:] != text[:-1]))
        counts[text[first]] = outside[first] - starts[text[first]]
    return counts


def _common_prefix(a: np.ndarray, b: np.ndarray, limit: int) -> int:
    """Leading positions (at most ``limit``) where the id arrays ``a`` and ``b`` agree."""
    m = min(limit, len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if differ.size else m


def _ordered(offsets: list[tuple[int, int]]) -> bool:
    """Whether the tokens' starts and ends both never decrease (``_searched_count`` relies on it)."""
    return all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(offsets, offsets[1:]))


def _searched_count(encoding, n_chars: int) -> int:
    """``prompt_token_counts``'s rule for one ``tokenizers.Encoding`` by bisection over its tokens'
    character spans (about log2(tokens) lookups instead of a Python tuple per token).

    With ordered offsets (``_ordered``) the rule's test, ``start < n_chars and end <= n_chars``, holds
    for a run of leading tokens and fails for every token after it, so the first failing token is the
    count. ``TextEncoder`` checks the order on the first text of every batch and otherwise applies
    the rule to every token's offsets.
    """
    lo, hi = 0, len(encoding)
    span = encoding.token_to_chars
    while lo < hi:
        mid = (lo + hi) // 2
        start, end = span(mid)
        if start < n_chars and end <= n_chars:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _direct_backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a fast tokenizer whose class keeps transformers' own call
    path (``__call__`` and ``_encode_plus``), else None."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    if not isinstance(tokenizer, TokenizersBackend) or cls.__call__ is not PreTrainedTokenizerBase.__call__ \
            or cls._encode_plus is not TokenizersBackend._encode_plus:
        return None
    return getattr(tokenizer, "backend_tokenizer", None)


_RUN = " \t\r\n"  # the whitespace a cut may precede (Unicode White_Space and str.isspace alike)


def cut_point(prompt: str) -> int:
    """Where ``prompt + response`` may be encoded in two parts for a tokenizer ``splits_at_cuts``
    accepts: the start of the run of ``" \\t\\r\\n"`` that holds the prompt's last newline, when a
    character that is not whitespace precedes it (``"...?\\n\\nAssistant:"``: before ``"\\n\\n"``), else 0
    (no cut). The prefix is the prompt's, shared by every response of the prompt.
    """
    j = prompt.rfind("\n")
    if j <= 0:
        return 0
    i = j
    while i > 0 and prompt[i - 1] in _RUN:
        i -= 1
    return i if i > 0 and not prompt[i - 1].isspace() else 0


def splits_at_cuts(backend) -> bool:
    """Whether the ``tokenizers.Tokenizer`` ``backend`` encodes ``text`` as ``text[:r]`` then
    ``text[r:]`` encoded apart, for every ``r = cut_point(prompt)`` (a non-whitespace character at
    ``r - 1``, whitespace at ``r``).

    True for byte-level BPE with GPT-2's pre-tokenizer regex (GPT-NeoX/Pythia, GPT-2), no dummy
    prefix space, an NFC or no normalizer, no BPE dropout, and no added token that could cover the
    cut (one holding whitespace and more, or stripping the whitespace next to it). Why it is exact:
    every alternative of that regex that matches a non-whitespace character stops at whitespace,
    and none begins with a non-whitespace character and goes on into whitespace, so a pre-token
    ends at ``r - 1`` and the next begins at ``r`` in the whole text; the regex has no look-behind
    and its one look-ahead (``\\s+(?!\\S)``) never crosses from ``text[:r]`` (which ends in a
    non-whitespace character) into ``text[r:]``, so both parts split into the whole text's
    pre-tokens; BPE merges within a pre-token only; NFC composes nothing across a whitespace
    character. ``TextEncoder`` still compares the first text of every call with the ordinary call.
    """
    try:
        from tokenizers import models, normalizers, pre_tokenizers
        pre, norm, model = backend.pre_tokenizer, backend.normalizer, backend.model
        if type(pre) is not pre_tokenizers.ByteLevel or pre.add_prefix_space or not pre.use_regex:
            return False
        if norm is not None and type(norm) is not normalizers.NFC:
            return False
        if type(model) is not models.BPE or model.dropout not in (None, 0.0):
            return False
        for token in backend.get_added_tokens_decoder().values():
            text = token.content
            if token.lstrip or token.rstrip or (any(c.isspace() for c in text) and not text.isspace()):
                return False
        return True
    except Exception:  # noqa: BLE001 - an unknown backend: encode whole texts
        return False


class _CutEncodings(NamedTuple):
    """The backend's encodings of texts cut at ``cut_point`` (``TextEncoder.raw``): ``encs`` holds each
    distinct prefix once and every text's remainder; text i is ``encs[prefix[i]]`` (-1: uncut) then
    ``encs[rest[i]]``, its remainder starting at character ``cuts[i]``."""

    encs: list
    prefix: list[int]
    rest: list[int]
    cuts: list[int]


def _flat(ids_lists, offsets_lists) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    lengths = np.fromiter(map(len, ids_lists), np.int64, len(ids_lists))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(ids_lists), np.int32, total)
    offsets = None if offsets_lists is None else np.fromiter(
        chain.from_iterable(chain.from_iterable(offsets_lists)), np.int64, 2 * total).reshape(total, 2)
    return ids, lengths, offsets


class TextEncoder:
    """``tokenizer(texts, add_special_tokens=False)`` for many texts per call, into ``EncodedTexts``.

    A fast tokenizer whose class keeps transformers' own call path is called through its
    ``tokenizers`` backend: the ordinary call, made once at construction and then on the first text
    of each call, sets the backend up as transformers does (no truncation or padding, its
    ``split_special_tokens``); the backend's ``encode_batch`` then encodes every text (``raw``: it
    releases the GIL, so another thread can run it ahead), and both must agree on that first text; if
    they ever differ, and for every other tokenizer, the ordinary call serves. The backend call
    builds no Python lists of attention masks or type ids. Neither call emits transformers'
    "Token indices sequence length is longer than the specified maximum" warning (the ordinary call
    runs with ``verbose=False``): caldpo truncates the sequences itself.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.fast = bool(getattr(tokenizer, "is_fast", False))
        self.backend = _direct_backend(tokenizer) if self.fast else None
        self.search = True  # the backend's boundary by bisection (``_searched_count``) while offsets are ordered
        self.cut = self.backend is not None and splits_at_cuts(self.backend)  # prompts' prefixes encoded once
        try:
            from transformers.tokenization_utils_base import PreTrainedTokenizerBase
            quiet = isinstance(tokenizer, PreTrainedTokenizerBase)
        except ImportError:
            quiet = False
        self.options = {"add_special_tokens": False, **({"verbose": False} if quiet else {})}
        if self.fast:
            self.options["return_offsets_mapping"] = True
        if self.backend is not None:
            self._ordinary([""])  # the backend set up before any ``raw`` call, which may run in another thread

    def _ordinary(self, texts: list[str]):
        enc = self.tokenizer(texts, **self.options)
        return enc["input_ids"], enc["offset_mapping"] if self.fast else None

    def raw(self, texts: list[str], prompts: list[str] | None = None) -> list | _CutEncodings | None:
        """The backend's encodings of ``texts`` (for ``__call__``), or None: no backend, or it raised
        (``__call__`` then finds the text at fault). With ``prompts`` (``prompts[i]`` begins
        ``texts[i]``) and a backend that ``splits_at_cuts``, each distinct prompt's part before its
        ``cut_point`` is encoded once (``_CutEncodings``): a pair's chosen and rejected share it."""
        if self.backend is None or not texts:
            return None
        try:
            if not (self.cut and self.search and prompts is not None):
                return self.backend.encode_batch(texts, add_special_tokens=False)
            parts, prefix, rest, cuts, seen = [], [], [], [], {}
            for text, prompt in zip(texts, prompts):
                r = cut_point(prompt)
                if r:
                    k = seen.get(prompt)
                    if k is None:
                        k = seen[prompt] = len(parts)
                        parts.append(prompt[:r])
                    prefix.append(k)
                else:
                    prefix.append(-1)
                rest.append(len(parts))
                parts.append(text[r:])
                cuts.append(r)
            return _CutEncodings(self.backend.encode_batch(parts, add_special_tokens=False), prefix, rest, cuts)
        except Exception:  # noqa: BLE001 - reported per text by __call__
            return None

    def _from_cuts(self, raw: _CutEncodings, n_chars: np.ndarray, ref_ids, ref_offsets
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(ids, lengths, prompt token counts) of texts encoded in parts; None when the first text
        differs from the ordinary call (``ref_ids``/``ref_offsets``) or offsets are out of order."""
        encs, prefix, rest, cuts = raw
        ids_of: dict[int, list[int]] = {-1: []}  # each distinct prefix's ids, converted once
        pre = []
        for k in prefix:
            if k not in ids_of:
                ids_of[k] = encs[k].ids
            pre.append(ids_of[k])
        tail = [encs[k] for k in rest]
        if not _ordered(tail[0].offsets):
            return None
        n = n_chars.tolist()
        counts = [len(p) + _searched_count(e, c - r) for p, e, c, r in zip(pre, tail, n, cuts)]
        tails = [e.ids for e in tail]
        first = list(ref_ids[0])
        ref_count = prompt_token_counts(np.asarray(ref_offsets[0], np.int64).reshape(-1, 2), [len(first)], n[:1])
        if pre[0] + tails[0] != first or counts[0] != int(ref_count[0]):
            return None
        lengths = np.fromiter(map(len, pre), np.int64, len(pre)) + np.fromiter(map(len, tails), np.int64, len(tails))
        ids = np.fromiter(chain.from_iterable(chain.from_iterable(zip(pre, tails))), np.int32, int(lengths.sum()))
        return ids, lengths, np.asarray(counts, np.int64)

    def _arrays(self, texts: list[str], n_chars: np.ndarray, raw: list | _CutEncodings | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(ids, lengths, prompt token counts or None) of ``texts`` whose prompts are ``n_chars``
        characters long; raises what the tokenizer raises. Counts are None for a tokenizer without
        offsets (``__call__`` then places the boundary by ids)."""
        if self.backend is not None:
            ref_ids, ref_offsets = self._ordinary(texts[:1])
            if isinstance(raw, _CutEncodings):
                got = self._from_cuts(raw, n_chars, ref_ids, ref_offsets)
                if got is not None:
                    return got
                self.cut, raw = False, None  # the parts do not reproduce the whole text: encode whole texts
            encs = raw if raw is not None else self.backend.encode_batch(texts, add_special_tokens=False)
            first = encs[0].offsets
            if encs[0].ids == list(ref_ids[0]) and first == [tuple(o) for o in ref_offsets[0]]:
                ids, lengths, _ = _flat([e.ids for e in encs], None)
                if self.search and not _ordered(first):
                    self.search = False  # offsets out of order: the search does not apply to this tokenizer
                if not self.search:
                    offsets = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encs)),
                                          np.int64, 2 * len(ids)).reshape(-1, 2)
                    return ids, lengths, prompt_token_counts(offsets, lengths, n_chars)
                return ids, lengths, np.fromiter(map(_searched_count, encs, n_chars.tolist()), np.int64, len(encs))
            self.backend = None  # the backend alone does not reproduce the ordinary call: use that
        ids, offsets = self._ordinary(texts)
        ids, lengths, offsets = _flat(ids, offsets)
        return ids, lengths, None if offsets is None else prompt_token_counts(offsets, lengths, n_chars)

    def _encode(self, texts: list[str], n_chars: np.ndarray, raw: list | _CutEncodings | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[int, Exception]]:
        """``_arrays`` of all texts at once; when that fails, text by text, recording each failure."""
        if not texts:
            return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64), {}
        try:
            return (*self._arrays(texts, n_chars, raw), {})
        except Exception:  # noqa: BLE001 - any encode failure is found and reported per text below
            pass
        parts, errors = [], {}
        for i, t in enumerate(texts):
            try:
                parts.append(self._arrays([t], n_chars[i:i + 1]))
            except Exception as e:  # noqa: BLE001
                errors[i] = e
                parts.append((np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(1, np.int64)))
        ids = np.concatenate([p[0] for p in parts])
        lengths = np.concatenate([p[1] for p in parts])
        counts = np.concatenate([p[2] for p in parts]) if self.fast else None
        return ids, lengths, counts, errors

    def __call__(self, texts: list[str], prompts: list[str], raw: list | _CutEncodings | None = None) -> EncodedTexts:
        """Encode ``texts``; ``prompts[i]`` is the prompt that text i starts with (its boundary); ``raw``:
        ``self.raw(texts, prompts)`` when it already ran.

        Fast tokenizers place the boundary by offsets (``prompt_token_counts``'s rule; through the
        backend it is found by bisection, ``_searched_count``); tokenizers without offsets at the
        longest common prefix with the prompt tokenized alone (each distinct prompt once).
        """
        n_chars = np.fromiter(map(len, prompts), np.int64, len(prompts))
        ids, lengths, counts, errors = self._encode(texts, n_chars, raw)
        bounds = np.zeros(len(texts) + 1, np.int64)
        np.cumsum(lengths, out=bounds[1:])
        if counts is None:
            distinct = list(dict.fromkeys(prompts))
            p_ids, p_lengths, _, p_errors = self._encode(distinct, np.fromiter(map(len, distinct), np.int64))
            p_bounds = np.concatenate(([0], np.cumsum(p_lengths)))
            where = {p: k for k, p in enumerate(distinct)}
            counts = np.zeros(len(texts), np.int64)
            for i, p in enumerate(prompts):
                k = where[p]
                if k in p_errors:
                    errors.setdefault(i, p_errors[k])
                    continue
                counts[i] = _common_prefix(ids[bounds[i]:bounds[i + 1]], p_ids[p_bounds[k]:p_bounds[k + 1]],
                                           int(p_lengths[k]))
        first_eos = np.full(len(texts), -1, np.int64)
        if self.eos is not None:
            hits = np.flatnonzero(ids == self.eos)
            if hits.size:
                text = np.searchsorted(bounds, hits, side="right") - 1
                first = np.concatenate(([True], text[1:] != text[:-1]))
                first_eos[text[first]] = hits[first] - bounds[text[first]]
        return EncodedTexts(ids, bounds, counts, first_eos, errors)


def prompt_span(n: int, limit: int, mode: str, keep_last: int = 0) -> tuple[int, int]:
    """The one prompt truncation rule, as counts: of a prompt of ``n`` tokens keep the first ``head``
    and the last ``tail`` (``(head, tail)``), at most ``limit`` in all.

    ``keep_end`` keeps the last ``limit`` tokens; ``keep_start`` keeps the first ones and, with
    ``keep_last`` > 0, also the final ``keep_last`` tokens (the prompt's cue, e.g. ``"\\nTL;DR:"``),
    dropping tokens in between. Training uses ``keep_last=0`` (the reference code's rule); generation
    passes ``prompt_cue_tokens``. Raises ValueError for another mode.
    """
    if mode not in ("keep_start", "keep_end"):
        raise ValueError(f"unknown truncation mode {mode!r}; use 'keep_start' or 'keep_end'")
    if n <= limit:
        return n, 0
    if mode == "keep_end":
        return 0, limit
    keep_last = min(keep_last, limit)
    return limit - keep_last, keep_last


def truncate_prompt(ids: Sequence[int], limit: int, mode: str, keep_last: int = 0) -> list[int]:
    """``ids`` cut to at most ``limit`` tokens by ``prompt_span`` (training and generation), as a list."""
    ids = list(ids)
    head, tail = prompt_span(len(ids), limit, mode, keep_last)
    return ids[:head] + (ids[len(ids) - tail:] if tail else [])


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
    encoder = TextEncoder(tokenizer)
    ids, offsets = encoder._ordinary([prompt])
    return list(ids[0]), [tuple(o) for o in offsets[0]] if offsets is not None else None


def _assemble(prompt: str, responses: dict[str, str], seqs: dict[str, np.ndarray], limits: list[int],
              eos_at: list[int], eos: tuple[int, str], max_length: int, max_prompt_length: int,
              truncation_mode: str) -> Encoded:
    """Split joint tokenizations at the prompt boundary, check EOS, append it, truncate.

    seqs: response name -> int32 ids of ``prompt + response``; limits: each sequence's prompt tokens by
    the boundary rule; eos_at: each sequence's first EOS position (-1: none); eos: (EOS id, EOS token).
    The prompt is the common prefix of all sequences within the smallest limit.
    """
    first = next(iter(seqs.values()))
    n = int(min(limits))
    for ids in seqs.values():
        if ids is not first:
            n = _common_prefix(first, ids, n)
    for (k, ids), at in zip(seqs.items(), eos_at):
        if at >= 0:
            part = "prompt" if at < n else f"{k} response"
            raise EOSInTextError(f"the {part} contains the EOS token {eos[1]!r} (id {eos[0]}), which "
                                 f"would end the sequence early: {(prompt + responses[k])[:120]!r}")
    prompt_ids = first[:n]
    tail = np.array(eos[:1], dtype=np.int32)
    resp = {k: np.concatenate((ids[n:], tail)) for k, ids in seqs.items()}
    longer = max(map(len, resp.values()))
    prompt_cut = response_cut = False
    if len(prompt_ids) + longer > max_length:
        prompt_cut = len(prompt_ids) > max_prompt_length
        head, kept_tail = prompt_span(len(prompt_ids), max_prompt_length, truncation_mode)
        prompt_ids = np.concatenate((prompt_ids[:head], prompt_ids[len(prompt_ids) - kept_tail:] if kept_tail
                                     else prompt_ids[:0]))
    if len(prompt_ids) + longer > max_length:
        response_cut = True
        resp = {k: r[: max_length - max_prompt_length] for k, r in resp.items()}
    return Encoded(np.array(prompt_ids, dtype=np.int32), resp["chosen"], resp.get("rejected"), prompt_cut,
                   response_cut)


def _check_mode(truncation_mode: str) -> None:
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"unknown truncation mode {truncation_mode!r}; use 'keep_start' or 'keep_end'")


def _check(tokenizer, truncation_mode: str) -> None:
    _check_mode(truncation_mode)
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
    enc = TextEncoder(tokenizer)([prompt + r for r in responses.values()], [prompt] * len(responses))
    if enc.errors:
        raise next(iter(enc.errors.values()))
    at = range(len(responses))
    return _assemble(prompt, responses, {k: enc.text(i) for i, k in zip(at, responses)},
                     [int(enc.prompt_tokens[i]) for i in at], [int(enc.first_eos[i]) for i in at],
                     (tokenizer.eos_token_id, tokenizer.eos_token), max_length, max_prompt_length, truncation_mode)


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
    """``example_dict`` of an example, from its cached ``tokens`` when the load-time pass set them."""
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


def _chunk_texts(chunk: list[Example]) -> tuple[list[str], list[str]]:
    texts, prompts = [], []
    for ex in chunk:
        texts.append(ex.prompt + ex.chosen)
        prompts.append(ex.prompt)
        if ex.rejected is not None:
            texts.append(ex.prompt + ex.rejected)
            prompts.append(ex.prompt)
    return texts, prompts


def tokenize_examples(examples: Iterable[Example], tokenizer, *, max_length: int, max_prompt_length: int,
                      report: TokenReport, on_error: str = "raise",
                      progress: Callable[[int], None] | None = None) -> Iterator[tuple[Example, Encoded]]:
    """The load-time pass: each kept example, in order, with its ids; counts in ``report``.

    Examples are tokenized ``_CHUNK`` at a time (``TextEncoder``: one batched call per chunk; the
    backend encodes the next two chunks in a background thread while this one is split and truncated).

    * a pair whose chosen and rejected ids are identical after truncation carries no
      preference: dropped and counted (``identical_after_truncation``);
    * text the tokenizer cannot encode (e.g. a lone surrogate) and text holding the EOS
      token raise ``ExampleError`` naming the row (``Example.source``), or with
      ``on_error="skip"`` are skipped and counted (``untokenizable``, ``eos_in_text``).

    ``progress(n)`` is called after each chunk with its number of examples. Raises ValueError for a
    tokenizer without an EOS id or an unknown truncation mode.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id")
    encoder = TextEncoder(tokenizer)
    eos = (tokenizer.eos_token_id, tokenizer.eos_token)

    def fail(ex: Example, reason: str, what: str) -> None:
        if on_error != "skip":
            raise ExampleError(ex.source, what, reason, "fix the row, or set data.on_error=skip to skip such rows")
        report.skip(reason)

    it = iter(examples)

    def next_chunk() -> list[Example]:
        chunk = list(islice(it, _CHUNK))
        for mode in {ex.truncation_mode for ex in chunk}:
            _check_mode(mode)
        return chunk

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="caldpo-tokenize") as pool:
        pending: deque = deque()  # (chunk, texts, prompts, the backend's encodings to come)

        def submit(chunk: list[Example]) -> None:
            texts, prompts = _chunk_texts(chunk)
            pending.append((chunk, texts, prompts, pool.submit(encoder.raw, texts, prompts)))

        for _ in range(2):  # two chunks ahead: the backend works while this thread splits and writes
            chunk = next_chunk()
            if chunk:
                submit(chunk)
        while pending:
            chunk, texts, prompts, raw = pending.popleft()
            following = next_chunk()
            if following:
                submit(following)
            enc = encoder(texts, prompts, raw.result())
            ids, bounds = enc.ids, enc.bounds.tolist()  # Python ints: cheaper per example than numpy scalars
            limits, first_eos, errors = enc.prompt_tokens.tolist(), enc.first_eos.tolist(), enc.errors
            i = 0
            for ex in chunk:
                report.examples += 1
                pair = ex.rejected is not None
                j = i
                i += 1 + pair
                bad = errors and (errors.get(j) or (pair and errors.get(j + 1)))
                if bad:
                    fail(ex, "untokenizable", f"the tokenizer cannot encode this text ({type(bad).__name__}: {bad})")
                    continue
                if pair:
                    responses = {"chosen": ex.chosen, "rejected": ex.rejected}
                    seqs = {"chosen": ids[bounds[j]:bounds[j + 1]], "rejected": ids[bounds[j + 1]:bounds[j + 2]]}
                else:
                    responses, seqs = {"chosen": ex.chosen}, {"chosen": ids[bounds[j]:bounds[j + 1]]}
                try:
                    e = _assemble(ex.prompt, responses, seqs, limits[j:i], first_eos[j:i], eos, max_length,
                                  max_prompt_length, ex.truncation_mode)
                except EOSInTextError as err:
                    fail(ex, "eos_in_text", str(err))
                    continue
                if pair and len(e.chosen) == len(e.rejected) and np.array_equal(e.chosen, e.rejected):
                    report.add(report.dropped, "identical_after_truncation")
                    continue
                report.prompts_cut += e.prompt_cut
                report.responses_cut += e.response_cut
                report.kept += 1
                yield ex, e
            if progress is not None:
                progress(len(chunk))


def tokenize_dataset(examples: Sequence[Example], tokenizer, *, max_length: int, max_prompt_length: int,
                     on_error: str = "raise", dataset: str = "", split: str = "") -> tuple[list[Example], TokenReport]:
    """``tokenize_examples`` over a list: the kept examples (``tokens`` set) and the report.

    For small datasets and tests; ``schedule.Examples`` keeps the ids of whole splits in flat
    arrays (``caldpo.train.tokens``) instead of one ``Example`` per row.
    """
    report = TokenReport(dataset, split, max_length, max_prompt_length)
    if not examples:
        return [], report
    kept = [ex._replace(tokens=enc) for ex, enc in
            tokenize_examples(examples, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                              report=report, on_error=on_error)]
    return kept, report


# ----------------------------------------------------------------------------- batches


def _pad(seqs: list[list[int]], value: int, left: bool) -> torch.Tensor:
    import torch  # here: the token cache's build process (caldpo.train.tokens) runs this module without torch

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
