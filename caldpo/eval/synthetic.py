"""A synthetic preference task with a known ground-truth reward (for the laptop reproduction).

Prompts ask for numbers; a response is a run of ``LENGTH`` digits from 1-8, written
" d d d ...". The ground-truth reward of a response is the number of *high* digits
(5-8) among its first ``LENGTH`` digit tokens, an integer in [0, LENGTH]; any other
text scores nothing. Responses are drawn uniformly, so the reward of a random
response is Binomial(LENGTH, 1/2). A preference pair is two distinct responses to one
prompt, labelled by Bradley-Terry on the ground truth:
``P(a preferred over b) = sigmoid(r(a) - r(b))``.

The files are written in HH format (``{"chosen", "rejected"}`` whole dialogues,
``"\\n\\nHuman: ..."``, ``"\\n\\nAssistant:"``), so ``python -m caldpo.train`` reads them
with ``datasets=[sample] data.paths.sample=DIR``. Each digit " d" is one token of the
tiny model's tokenizer (caldpo/train/tiny.py).

CLI: ``python -m caldpo.eval.synthetic --out DIR [--n-train N] [--n-test N] [--seed S]``.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
from pathlib import Path

LENGTH = 8
DIGITS = "12345678"
HIGH = frozenset("5678")
SUBJECTS = ("my lottery ticket", "a phone number", "the game", "a puzzle", "my homework", "a password",
            "the raffle", "a code", "the quiz", "my list", "a bingo card", "the test", "a song", "the map")
VERBS = ("Give me", "Say", "List", "Write", "Pick", "Choose")
_DIGIT = re.compile(r"\d")


def prompt_text(rng: random.Random) -> str:
    """An HH-format prompt, ending with the Assistant turn marker."""
    return (f"\n\nHuman: {rng.choice(VERBS)} some numbers for {rng.choice(SUBJECTS)}, "
            f"round {rng.randrange(1000)}.\n\nAssistant:")


def response_text(rng: random.Random) -> str:
    """A response of LENGTH uniform digits from 1-8, each preceded by a space."""
    return "".join(" " + rng.choice(DIGITS) for _ in range(LENGTH))


def reward(response: str) -> int:
    """Ground-truth reward: how many of the first LENGTH digits in ``response`` are 5-8."""
    return sum(d in HIGH for d in _DIGIT.findall(response)[:LENGTH])


def preference_pair(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, chosen, rejected): two distinct responses, the chosen one drawn by Bradley-Terry."""
    prompt = prompt_text(rng)
    a = response_text(rng)
    b = response_text(rng)
    while b == a:
        b = response_text(rng)
    p_a = 1.0 / (1.0 + math.exp(reward(b) - reward(a)))
    return (prompt, a, b) if rng.random() < p_a else (prompt, b, a)


def write_task(out_dir, n_train: int = 512, n_test: int = 64, seed: int = 0) -> Path:
    """Write ``train.jsonl`` and ``test.jsonl`` (HH rows) into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                prompt, chosen, rejected = preference_pair(rng)
                f.write(json.dumps({"chosen": prompt + chosen, "rejected": prompt + rejected}) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-test", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write_task(a.out, a.n_train, a.n_test, a.seed))


if __name__ == "__main__":
    main()
