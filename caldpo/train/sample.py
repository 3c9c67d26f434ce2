"""The shipped HH-format preference sample, written from the project's own templates.

`python -m caldpo.train.sample [--out DIR]` deterministically (fixed seed, no
third-party text) writes `train.jsonl` and `test.jsonl` in the exact Anthropic
hh-rlhf row format: `{"chosen": str, "rejected": str}`, whole dialogues starting
with "\\n\\nHuman: ", sharing the prompt up to and including the last
"\\n\\nAssistant:", with responses that start with a space.

The preference is learnable by a tiny model in minutes, so the sample can
check that a trainer moves reward accuracy above chance:
- about half the rejected replies are rude or unhelpful refusals (a style signal
  that generalises to unseen prompts);
- the rest are the chosen reply with a wrong fact (arithmetic, capitals, colours,
  opposites) in the same wording, a content signal: facts recur across the
  splits under different question templates, so memorising them transfers.
Train and test use disjoint question templates, so no prompt occurs in both.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random

SEED = 20240601
N_TRAIN = 400
N_TEST = 64
SPLITS = ("train", "test")
SAMPLE_DIR = pathlib.Path(__file__).resolve().parent / "sample"

CAPITALS = [
    ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"),
    ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"),
    ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Mexico", "Mexico City"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
    ("Ireland", "Dublin"), ("Sweden", "Stockholm"), ("Cuba", "Havana"),
    ("Chile", "Santiago"), ("Thailand", "Bangkok"), ("Turkey", "Ankara"),
]
COLORS = [
    ("the sky on a clear day", "blue"), ("fresh grass", "green"), ("snow", "white"),
    ("a ripe banana", "yellow"), ("coal", "black"), ("a ripe tomato", "red"),
    ("a carrot", "orange"), ("a lemon", "yellow"), ("milk", "white"),
    ("a strawberry", "red"), ("chocolate", "brown"), ("a summer leaf", "green"),
    ("the night sky", "black"), ("the sea", "blue"), ("a pumpkin", "orange"),
    ("an eggplant", "purple"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"),
    ("happy", "sad"), ("light", "dark"), ("open", "closed"), ("wet", "dry"),
    ("early", "late"), ("full", "empty"), ("loud", "quiet"), ("hard", "soft"),
    ("high", "low"), ("strong", "weak"), ("thick", "thin"), ("young", "old"),
    ("rich", "poor"), ("true", "false"), ("first", "last"), ("inside", "outside"),
]
# (train phrasing, test phrasing, helpful reply, on-topic but useless reply)
ADVICE = [
    ("How can I sleep better?", "Any tips for falling asleep faster?",
     "Go to bed at the same time every night and keep your room dark and cool.",
     "Sleep is hard. Good luck with that."),
    ("How do I boil an egg?", "What is the best way to cook a hard boiled egg?",
     "Put the egg in boiling water for about nine minutes, then cool it in cold water.",
     "Eggs are food. You can cook them somehow."),
    ("How can I learn a new language?", "What helps when studying a foreign language?",
     "Practice a little every day, learn common words first, and talk with native speakers.",
     "Languages have a lot of words. It takes a while."),
    ("How do I keep a plant alive?", "My house plant keeps dying. What should I do?",
     "Give it light, water it when the soil is dry, and do not let the pot sit in water.",
     "Plants die sometimes. That is life."),
    ("How can I save money?", "What are easy ways to spend less money?",
     "Make a monthly budget, cook at home more often, and cancel subscriptions you do not use.",
     "Money is complicated. Just spend less, I guess."),
    ("How do I write a good email?", "Can you help me write a clear email?",
     "Use a short subject line, state your request early, and end with a polite thank you.",
     "Just write something. People will read it or not."),
    ("How can I stay calm before a test?", "I am nervous about my exam. Any advice?",
     "Breathe slowly, prepare a little each day, and get a good night of sleep before it.",
     "Tests are stressful for everyone. Nothing helps."),
    ("How do I make my bed?", "What is a neat way to make a bed?",
     "Straighten the sheet, pull the blanket up, fold the top edge, and place the pillow on top.",
     "Beds get messy anyway. Why bother?"),
    ("How can I be more productive?", "Any tips to get more work done in a day?",
     "Write a short list of tasks, start with the most important one, and take short breaks.",
     "Some people are productive and some are not."),
    ("How do I clean a window?", "What is the best way to wash a window?",
     "Spray it with soapy water, wipe with a clean cloth from top to bottom, then dry it.",
     "Windows get dirty. It happens."),
    ("How can I drink more water?", "I forget to drink water. What can I do?",
     "Keep a bottle on your desk and drink a glass with every meal.",
     "Water is wet. Drink it when you want."),
    ("How do I start running?", "What is a good way to begin jogging?",
     "Start with short easy runs, mix in walking, and add a few minutes each week.",
     "Running is just moving your legs fast."),
]
RUDE = [
    "No. Look it up yourself.",
    "I am not going to answer that.",
    "Why would I tell you? Go away.",
    "Figure it out yourself.",
    "That is not my problem.",
    "Stop asking me questions.",
    "I do not care. Ask someone else.",
    "Not my job. Leave me alone.",
]
UNHELPFUL = [
    "I don't know.",
    "Maybe. Who knows.",
    "Hard to say, really.",
    "Hmm. Something like that.",
]
POLITE = ["", "Sure! ", "Of course. ", "Good question. ", "Happy to help. "]

# Question templates per split (disjoint, so train and test prompts never coincide).
Q = {
    "train": {
        "plus": ["What is {a} plus {b}?", "Can you add {a} and {b} for me?"],
        "times": ["What is {a} times {b}?", "Can you multiply {a} by {b}?"],
        "minus": ["What is {a} minus {b}?"],
        "capital": ["What is the capital of {x}?", "Do you know the capital of {x}?"],
        "color": ["What color is {x}?"],
        "opposite": ["What is the opposite of {x}?", "What word means the opposite of {x}?"],
    },
    "test": {
        "plus": ["How much is {a} plus {b}?"],
        "times": ["Please tell me {a} times {b}."],
        "minus": ["How much is {a} minus {b}?"],
        "capital": ["Which city is the capital of {x}?"],
        "color": ["Tell me the color of {x}."],
        "opposite": ["Give me the opposite of the word {x}."],
    },
}
GREETINGS = {
    "train": [("Hi there.", "Hello! How can I help you today?"),
              ("Good morning!", "Good morning! What can I do for you?")],
    "test": [("Hey, are you there?", "Yes, I am here. What do you need?")],
}
OPS = {"plus": lambda a, b: a + b, "times": lambda a, b: a * b, "minus": lambda a, b: a - b}


def sample_path(split: str) -> pathlib.Path:
    """Path of the shipped sample file for `split` ("train" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SAMPLE_DIR / f"{split}.jsonl"


def _fact(rng: random.Random, split: str) -> tuple[str, str, str]:
    """One factual question with its right and a wrong answer, worded alike."""
    kind = rng.choice(["plus", "times", "minus", "capital", "color", "opposite"])
    q = rng.choice(Q[split][kind])
    if kind in OPS:
        a, b = rng.randint(2, 12), rng.randint(2, 9 if kind == "times" else 12)
        if kind == "minus" and a < b:
            a, b = b, a
        c = OPS[kind](a, b)
        wrong = c + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if c + d >= 0])
        ans = "{a} " + kind + " {b} is {c}."
        return q.format(a=a, b=b), ans.format(a=a, b=b, c=c), ans.format(a=a, b=b, c=wrong)
    table = {"capital": CAPITALS, "color": COLORS, "opposite": OPPOSITES}[kind]
    x, y = rng.choice(table)
    z = rng.choice([v for _, v in table if v != y])
    ans = {"capital": "The capital of {x} is {y}.", "color": "{X} is {y}.",
           "opposite": "The opposite of {x} is {y}."}[kind]
    fill = lambda v: ans.format(x=x, X=x[0].upper() + x[1:], y=v)  # noqa: E731
    return q.format(x=x), fill(y), fill(z)


def _row(rng: random.Random, split: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) for one preference pair."""
    if rng.random() < 0.2:
        i = rng.randrange(len(ADVICE))
        question, good, useless = ADVICE[i][0 if split == "train" else 1], ADVICE[i][2], ADVICE[i][3]
        bad = useless if rng.random() < 0.5 else rng.choice(RUDE)
        history = f"\n\nHuman: {question}\n\nAssistant:"
        return history, " " + good, " " + bad
    question, right, wrong = _fact(rng, split)
    polite = rng.choice(POLITE)
    r = rng.random()
    bad = (polite + wrong) if r < 0.5 else rng.choice(RUDE) if r < 0.85 else rng.choice(UNHELPFUL)
    history = ""
    if rng.random() < 0.25:  # multi-turn: an earlier exchange before the question
        if rng.random() < 0.5:
            hi, hello = rng.choice(GREETINGS[split])
        else:
            hi, hello, _ = _fact(rng, split)
        history = f"\n\nHuman: {hi}\n\nAssistant: {hello}"
    history += f"\n\nHuman: {question}\n\nAssistant:"
    return history, " " + polite + right, " " + bad


def generate(split: str, n: int, seed: int = SEED) -> list[dict[str, str]]:
    """`n` distinct HH rows for `split`, fully determined by `seed`."""
    rng = random.Random(f"{seed}-{split}")
    rows, seen = [], set()
    while len(rows) < n:
        prompt, chosen, rejected = _row(rng, split)
        if chosen == rejected or (prompt, chosen, rejected) in seen:
            continue
        seen.add((prompt, chosen, rejected))
        rows.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
    return rows


def write(out_dir: str | pathlib.Path = SAMPLE_DIR) -> list[pathlib.Path]:
    """Write train.jsonl and test.jsonl into `out_dir`; return their paths."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        path = out_dir / f"{split}.jsonl"
        lines = [json.dumps(r, ensure_ascii=True) + "\n" for r in generate(split, n)]
        path.write_bytes("".join(lines).encode("ascii"))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(SAMPLE_DIR), help="output folder (default: the shipped one)")
    for path in write(p.parse_args(argv).out):
        print(path)


if __name__ == "__main__":
    main()
