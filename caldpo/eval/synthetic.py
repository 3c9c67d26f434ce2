"""A synthetic preference task with a known ground-truth reward (for the laptop reproduction).

Prompts ask for numbers; a response is a run of ``LENGTH`` digits, written " d d d ...".
The ground-truth reward of a response is the number of *high* digits (5-8) among its first
``LENGTH`` digit tokens, an integer in [0, LENGTH]; any other text scores nothing. A
response is *in format* when it is exactly ``LENGTH`` digits from 1-8 in that form.

The task is off-policy, as the paper's setting is (its SFT reference was tuned on other data
than the preference pairs):

- the SFT data (``sft/``) has responses drawn uniformly from the digits 1-8: the reference
  is fit to them, and a random response's reward is Binomial(LENGTH, 1/2);
- the preference pairs (``pref/``), on other prompts, are written by a *teacher* that writes
  only the even digits 2, 4, 6, 8 (so its reward is Binomial(LENGTH, 1/2) too: 6 and 8 are
  high). A pair is two distinct teacher responses labelled by Bradley-Terry on the ground
  truth: ``P(a preferred over b) = sigmoid(r(a) - r(b))``.

A policy can thus raise the likelihood of both responses of a held-out pair above the
reference's (by moving mass to the teacher's digits), which a task whose pairs come from the
reference's own distribution does not allow once the policy improves.

The files are written in HH format (``{"chosen", "rejected"}`` whole dialogues,
``"\\n\\nHuman: ..."``, ``"\\n\\nAssistant:"``), so ``python -m caldpo.train`` reads them
with ``datasets=[sample] data.paths.sample=DIR/sft`` (or ``DIR/pref``); an SFT row's rejected
side is another uniform response, unused by SFT. Each digit " d" is one token of the tiny
model's tokenizer (caldpo/train/tiny.py).

CLI: ``python -m caldpo.eval.synthetic --out DIR [--n-sft N] [--n-train N] [--n-test N] [--seed S]``.
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
TEACHER_DIGITS = "2468"
HIGH = frozenset("5678")
SUBJECTS = ("my lottery ticket", "a phone number", "the game", "a puzzle", "my homework", "a password",
            "the raffle", "a code", "the quiz", "my list", "a bingo card", "the test", "a song", "the map")
VERBS = ("Give me", "Say", "List", "Write", "Pick", "Choose")
_DIGIT = re.compile(r"\d")
_FORMAT = re.compile(f"( [{DIGITS}]){{{LENGTH}}}")


def prompt_text(rng: random.Random) -> str:
    """An HH-format prompt, ending with the Assistant turn marker."""
    return (f"\n\nHuman: {rng.choice(VERBS)} some numbers for {rng.choice(SUBJECTS)}, "
            f"round {rng.randrange(1000)}.\n\nAssistant:")


def response_text(rng: random.Random, digits: str = DIGITS) -> str:
    """A response of LENGTH uniform draws from ``digits`` (default 1-8), each preceded by a space."""
    return "".join(" " + rng.choice(digits) for _ in range(LENGTH))


def teacher_text(rng: random.Random) -> str:
    """The teacher's response: LENGTH uniform even digits (2, 4, 6, 8)."""
    return response_text(rng, TEACHER_DIGITS)


def reward(response: str) -> int:
    """Ground-truth reward: how many of the first LENGTH digits in ``response`` are 5-8."""
    return sum(d in HIGH for d in _DIGIT.findall(response)[:LENGTH])


def in_format(response: str) -> bool:
    """Whether ``response`` (decoded, special tokens dropped) is exactly LENGTH digits 1-8, each after a space."""
    return _FORMAT.fullmatch(response) is not None


def even_fraction(response: str) -> float:
    """Fraction of the first LENGTH digits that are the teacher's (2, 4, 6, 8); 0 without digits."""
    digits = _DIGIT.findall(response)[:LENGTH]
    return sum(d in TEACHER_DIGITS for d in digits) / len(digits) if digits else 0.0


def preference_pair(rng: random.Random, write=teacher_text) -> tuple[str, str, str]:
    """(prompt, chosen, rejected): two distinct responses by ``write``, the chosen one drawn by Bradley-Terry."""
    prompt = prompt_text(rng)
    a = write(rng)
    b = write(rng)
    while b == a:
        b = write(rng)
    p_a = 1.0 / (1.0 + math.exp(reward(b) - reward(a)))
    return (prompt, a, b) if rng.random() < p_a else (prompt, b, a)


def sft_row(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, target, other): an SFT example, both responses uniform over 1-8 (SFT reads the target only)."""
    return prompt_text(rng), response_text(rng), response_text(rng)


def write_task(out_dir, n_sft: int = 512, n_train: int = 512, n_test: int = 64, seed: int = 0) -> Path:
    """Write ``sft/{train,test}.jsonl`` (the reference's data) and ``pref/{train,test}.jsonl`` (the teacher's
    pairs; ``n_train`` / ``n_test`` rows) into ``out_dir`` as HH rows; returns the folder. Each part draws from
    its own seeded stream, so the SFT data does not change with the number of pairs."""
    out = Path(out_dir)
    for part, make, sizes in (("sft", sft_row, (("train", n_sft), ("test", n_test))),
                              ("pref", preference_pair, (("train", n_train), ("test", n_test)))):
        rng = random.Random(f"{seed}/{part}")
        (out / part).mkdir(parents=True, exist_ok=True)
        for split, n in sizes:
            with open(out / part / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for _ in range(n):
                    prompt, chosen, rejected = make(rng)
                    f.write(json.dumps({"chosen": prompt + chosen, "rejected": prompt + rejected}) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-sft", type=int, default=512)
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-test", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write_task(a.out, a.n_sft, a.n_train, a.n_test, a.seed))


if __name__ == "__main__":
    main()
