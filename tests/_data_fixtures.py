"""Helpers for the data and batch tests: a character-level tokenizer and row writers."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

EOS = "<|endoftext|>"
EOS_ID = 128
# Genuine HH and TL;DR rows shipped with the tests (tests/data/realdata/SOURCES.md: where each line comes from, licenses).
REALDATA = Path(__file__).resolve().parent / "data" / "realdata"
# The team's copy beside a checkout, when there is one: the shipped rows must stay byte-identical to it.
SHARED_REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


def char_tokenizer():
    """One token per character, id = ord(c) for ASCII; EOS is id 128, unknown chars 129."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(128)}
    vocab[EOS] = EOS_ID
    vocab["<unk>"] = 129
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="<unk>")
    fast.pad_token = EOS
    return fast


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    """Write rows (dicts are JSON-encoded, str/bytes written as given) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b""
    for r in rows:
        if isinstance(r, bytes):
            data += r + b"\n"
        elif isinstance(r, str):
            data += r.encode() + b"\n"
        else:
            data += json.dumps(r).encode() + b"\n"
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def hh(prompt_turns: str, chosen: str, rejected: str) -> dict:
    return {"chosen": prompt_turns + chosen, "rejected": prompt_turns + rejected}


def comparison(post="My post.", title="A title", subreddit="relationships", texts=(" first", " second"),
               choice=0, split="train", **info_extra) -> dict:
    info = {"id": "t3_x", "post": post, "title": title, "subreddit": subreddit, **info_extra}
    return {"info": info, "split": split, "summaries": [{"text": t, "policy": "p", "note": None} for t in texts],
            "choice": choice, "worker": "w", "batch": "b0", "extra": {}}
