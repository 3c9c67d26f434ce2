"""Tokenization, truncation, label masking, collation and the deterministic example order.

``tokenize_example`` reproduces ``tokenize_batch_element`` of the reference DPO code
token for token, so that losses and log-probs are comparable with it:

* prompt, chosen and rejected are tokenized separately (no special tokens) and EOS is
  appended to each response;
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
from typing import Any, Sequence

import torch

from .data import PromptGroup

IGNORE_INDEX = -100


class EOSInTextError(ValueError):
    """A prompt or response whose tokens already contain the EOS id."""


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_example(prompt: str, chosen: str, rejected: str | None, tokenizer, *, max_length: int,
                     max_prompt_length: int, truncation_mode: str) -> dict[str, Any]:
    """Token ids, attention masks and labels for one prompt and its one or two responses.

    Keys: ``prompt``, ``chosen``/``rejected`` (prompt + response text),
    ``chosen_response_only``/``rejected_response_only``, ``prompt_input_ids``,
    ``prompt_attention_mask`` and ``{chosen,rejected}_{input_ids,attention_mask,labels}``
    (the rejected keys only when ``rejected`` is not None, i.e. for preference pairs).
    """
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"unknown truncation mode {truncation_mode!r}; use 'keep_start' or 'keep_end'")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id")
    texts = {"prompt": prompt, "chosen": chosen}
    if rejected is not None:
        texts["rejected"] = rejected
    toks = {k: _ids(tokenizer, t) for k, t in texts.items()}
    for k, ids in toks.items():
        if eos in ids:
            raise EOSInTextError(f"{k} text contains the EOS token {tokenizer.eos_token!r} (id {eos}): {texts[k][:200]!r}")
    prompt_ids = toks.pop("prompt")
    responses = {k: ids + [eos] for k, ids in toks.items()}
    longer = max(len(ids) for ids in responses.values())
    if len(prompt_ids) + longer > max_length:
        prompt_ids = prompt_ids[:max_prompt_length] if truncation_mode == "keep_start" else prompt_ids[-max_prompt_length:]
    if len(prompt_ids) + longer > max_length:
        responses = {k: ids[: max_length - max_prompt_length] for k, ids in responses.items()}

    out: dict[str, Any] = {"prompt": prompt, "prompt_input_ids": prompt_ids, "prompt_attention_mask": [1] * len(prompt_ids)}
    n = len(prompt_ids)
    for k, ids in responses.items():
        seq = prompt_ids + ids
        out[k] = prompt + texts[k]
        out[f"{k}_response_only"] = texts[k]
        out[f"{k}_input_ids"] = seq
        out[f"{k}_attention_mask"] = [1] * len(seq)
        out[f"{k}_labels"] = [IGNORE_INDEX] * n + ids
    return out


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


def flatten(groups: dict[str, PromptGroup], *, sft: bool) -> list[tuple[str, str, str | None, str]]:
    """Training examples ``(prompt, chosen, rejected or None, truncation_mode)`` in group order.

    SFT: one per prompt with its SFT target. Preference: one per pair.
    """
    if sft:
        return [(g.prompt, g.sft_target, None, g.truncation_mode) for g in groups.values()]
    return [(g.prompt, g.responses[i], g.responses[j], g.truncation_mode) for g in groups.values() for i, j in g.pairs]


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
    """The order of ``n`` examples in ``epoch``: a permutation fixed by ``seed + epoch``.

    Deterministic across runs and processes, so a resumed run can skip to its position.
    """
    order = list(range(n))
    if shuffle:
        random.Random(seed + epoch).shuffle(order)
    return order


def tokenize_all(examples: Sequence[tuple[str, str, str | None, str]], tokenizer, *, max_length: int,
                 max_prompt_length: int) -> list[dict[str, Any]]:
    """``tokenize_example`` for each flattened example (convenience for small datasets and tests)."""
    return [tokenize_example(p, c, r, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                             truncation_mode=m) for p, c, r, m in examples]
