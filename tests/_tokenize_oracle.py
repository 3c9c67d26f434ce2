"""Test-side oracle: the load-time tokenization as caldpo did it before token ids moved to flat arrays.

A frozen copy of ``caldpo.train.batches`` at commit 6d03725 (``_encode``, ``_prompt_tokens``,
``_common_prefix``, ``truncate_prompt``, ``_assemble``, ``tokenize_dataset``), kept apart from the
package so that the tests of the batched, cached path compare it with the code it replaced and
never with itself. Only the return types are simplified (plain lists and counts). Do not "fix"
this file: it is the definition the new path must reproduce token for token.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

_CHUNK = 512


class OracleExample(NamedTuple):
    """One kept example: prompt ids, response ids (EOS appended unless truncation cut it), flags."""

    source: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int] | None
    prompt_cut: bool
    response_cut: bool


class OracleReport(NamedTuple):
    examples: int
    kept: int
    prompts_cut: int
    responses_cut: int
    dropped: dict
    skipped: dict
    failed: list  # (source, reason) of each example skipped, in order


class _EOSInText(ValueError):
    pass


def _encode(tokenizer, texts):
    fast = bool(getattr(tokenizer, "is_fast", False))

    def call(batch):
        enc = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=fast)
        offs = enc["offset_mapping"] if fast else [None] * len(batch)
        return [(list(i), [tuple(o) for o in off] if off is not None else None)
                for i, off in zip(enc["input_ids"], offs)]

    out = []
    for s in range(0, len(texts), _CHUNK):
        batch = texts[s:s + _CHUNK]
        try:
            out.extend(call(batch))
        except Exception:  # noqa: BLE001
            for t in batch:
                try:
                    out.extend(call([t]))
                except Exception as e:  # noqa: BLE001
                    out.append(e)
    return out


def _prompt_tokens(offsets, n_chars):
    n = 0
    for start, end in offsets:
        if not (start < n_chars and end <= n_chars):
            break
        n += 1
    return n


def _common_prefix(a, b, limit):
    n = 0
    while n < limit and n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def truncate_prompt(ids, limit, mode, keep_last=0):
    ids = list(ids)
    if len(ids) <= limit:
        return ids
    if mode == "keep_end":
        return ids[len(ids) - limit:]
    keep_last = min(keep_last, limit)
    return ids[:limit - keep_last] + (ids[len(ids) - keep_last:] if keep_last else [])


def _assemble(prompt, responses, joint, alone, tokenizer, max_length, max_prompt_length, truncation_mode):
    eos = tokenizer.eos_token_id
    n_chars = len(prompt)
    seqs = {k: ids for k, (ids, _) in joint.items()}
    limits = []
    for ids, offsets in joint.values():
        if offsets is not None:
            limits.append(_prompt_tokens(offsets, n_chars))
        else:
            limits.append(_common_prefix(ids, alone[0], len(alone[0])))
    first = next(iter(seqs.values()))
    n = min(limits)
    for ids in seqs.values():
        n = _common_prefix(first, ids, n)
    for k, ids in seqs.items():
        if eos in ids:
            raise _EOSInText(k)
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
    return prompt_ids, resp, prompt_cut, response_cut


def tokenize_dataset(examples: Sequence, tokenizer, *, max_length: int, max_prompt_length: int):
    """(kept OracleExamples, OracleReport) for ``batches.Example``-like items (prompt, chosen,
    rejected, truncation_mode, source); bad text is skipped and counted (``on_error="skip"``)."""
    dropped, skipped, failed = {}, {}, []
    fast = bool(getattr(tokenizer, "is_fast", False))
    texts = []
    for ex in examples:
        texts.append(ex.prompt + ex.chosen)
        if ex.rejected is not None:
            texts.append(ex.prompt + ex.rejected)
        if not fast:
            texts.append(ex.prompt)
    encoded = iter(_encode(tokenizer, texts))
    kept, prompts_cut, responses_cut = [], 0, 0
    for ex in examples:
        responses = {"chosen": ex.chosen} if ex.rejected is None else {"chosen": ex.chosen, "rejected": ex.rejected}
        res = [next(encoded) for _ in responses]
        alone = None if fast else next(encoded)
        if any(isinstance(r, Exception) for r in (*res, alone)):
            skipped["untokenizable"] = skipped.get("untokenizable", 0) + 1
            failed.append((ex.source, "untokenizable"))
            continue
        try:
            p, resp, pc, rc = _assemble(ex.prompt, responses, dict(zip(responses, res)), alone, tokenizer,
                                        max_length, max_prompt_length, ex.truncation_mode)
        except _EOSInText:
            skipped["eos_in_text"] = skipped.get("eos_in_text", 0) + 1
            failed.append((ex.source, "eos_in_text"))
            continue
        if "rejected" in resp and resp["chosen"] == resp["rejected"]:
            dropped["identical_after_truncation"] = dropped.get("identical_after_truncation", 0) + 1
            continue
        prompts_cut += pc
        responses_cut += rc
        kept.append(OracleExample(ex.source, p, resp["chosen"], resp.get("rejected"), pc, rc))
    report = OracleReport(len(examples), len(kept), prompts_cut, responses_cut, dropped, skipped, failed)
    return kept, report
