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


def hh_edge_rows(n: int = 60, seed: int = 0) -> list:
    """HH rows (keep_end) that exercise every load and truncation rule at small max_length (e.g. 64/24
    with ``char_tokenizer``): prompts and responses from empty to a few hundred characters, several
    pairs of one prompt, pairs identical after truncation (a long shared start), identical pairs,
    empty final replies, a prompt not shared (two Assistant turns in a row), and two rows the
    tokenizer rejects (a lone surrogate as a JSON escape, EOS inside a reply): str lines, JSON."""
    import random

    rng = random.Random(seed)
    words = "the of and to a in is you that it for was on are as with his they at be this".split()

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    rows = []
    for i in range(n):
        turns = "".join(f"\n\nHuman: {text(1, 12)}\n\nAssistant: {text(1, 12)}" for _ in range(rng.randint(0, 4)))
        prompt = f"{turns}\n\nHuman: q{i} {text(0, 30)}\n\nAssistant:"
        kind = i % 6
        if kind == 0:  # identical after truncation: both replies share a long start
            shared = " " + text(20, 30)
            rows.append(hh(prompt, shared + " yes", shared + " no"))
        elif kind == 1:  # empty final reply on one side, and a second pair of the same prompt
            rows.append(hh(prompt, " " + text(1, 5), " "))
            rows.append(hh(prompt, " " + text(1, 5), ""))
        elif kind == 2:  # identical pair (dropped at load)
            r = " " + text(1, 5)
            rows.append(hh(prompt, r, r))
        elif kind == 3:  # two Assistant turns in a row on one side (prompt not shared)
            rows.append({"chosen": prompt + " " + text(1, 4) + "\n\nAssistant: " + text(1, 3),
                         "rejected": prompt + " " + text(1, 6)})
        else:
            rows.append(hh(prompt, " " + text(0, 60), " " + text(0, 60)))
    lines = [json.dumps(r) for r in rows]
    lines[7] = lines[7].replace("Human: q", "Human: \\ud83d q")  # untokenizable text (both sides)
    lines[11] = json.dumps(hh("\n\nHuman: stop\n\nAssistant:", f" early{EOS} end", " fine"))  # EOS in text
    return lines


def tldr_edge_rows(n: int = 30, seed: int = 1) -> list[dict]:
    """TL;DR comparison rows (keep_start) with posts from a few words to a few hundred characters and
    summaries from empty to long, some with a leading space and some without, one ``r/`` subreddit; then
    preprocessed rows (prompt, chosen, rejected) whose prompts end in whitespace and whose responses
    start with or without one (tokens straddling or trimmed at the boundary)."""
    import random

    rng = random.Random(seed)
    words = "i my boyfriend and we have been together for two years but now he wants to move".split()

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    rows = []
    for i in range(n):
        shared = text(15, 25) if i % 5 == 0 else ""
        a, b = shared + " " + text(0, 20), shared + " " + text(0, 20)
        rows.append(comparison(post=f"post {i}: {text(2, 80)}", title=text(1, 8),
                               subreddit="r/relationships" if i == 3 else "relationships",
                               texts=(a if i % 2 else a.strip(), b), choice=i % 2))
    for i, end in enumerate([" ", "  ", "\n", " \n ", ""] * 2):  # preproc rows: prompts ending in whitespace
        rows.append({"prompt": f"SUBREDDIT: r/x\nTITLE: t{i}\nPOST: {text(2, 40)}\nTL;DR:{end}",
                     "chosen": rng.choice(["", " ", "a ", " b"]) + text(0, 6), "rejected": text(1, 6) + " "})
    return rows


def without_offsets(tok):
    """``tok`` as a slow tokenizer would present itself: no offsets (callers then place the prompt's end
    at the common prefix with the prompt encoded alone)."""

    class NoOffsets:
        is_fast = False
        eos_token, eos_token_id = tok.eos_token, tok.eos_token_id

        def __call__(self, texts, add_special_tokens=False, return_offsets_mapping=False):
            assert not return_offsets_mapping
            return tok(texts, add_special_tokens=add_special_tokens)

    return NoOffsets()
