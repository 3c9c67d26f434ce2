"""The synthetic ground-truth task, and ``python -m caldpo.eval.reproduce``: a reduced run recomputed exactly,
and the recorded full table recomputed from its own report."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from caldpo.eval import reproduce, synthetic

REPO = Path(__file__).resolve().parents[1]
RECORDED = sorted((REPO / "benchmarks" / "results").glob("reproduce_*"))[-1]  # the newest recorded run


def gt_reward(text: str) -> int:
    """The task's ground truth, written independently: digits 5-8 among the first 8 digits."""
    digits = [c for c in text if c.isdigit()][:8]
    return sum(c in "5678" for c in digits)


def in_format(text: str) -> bool:
    """Exactly eight ' d' with d in 1-8, written independently."""
    return len(text) == 16 and all(text[i] == " " and text[i + 1] in "12345678" for i in range(0, 16, 2))


def split_rows(path: Path) -> list[tuple[str, str, str]]:
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        cut = r["chosen"].rindex("\n\nAssistant:") + len("\n\nAssistant:")
        assert r["rejected"][:cut] == r["chosen"][:cut] and r["chosen"].startswith("\n\nHuman: ")
        out.append((r["chosen"][:cut], r["chosen"][cut:], r["rejected"][cut:]))
    return out


def test_task_is_off_policy_and_labelled_by_bradley_terry(tmp_path):
    d = synthetic.write_task(tmp_path, n_sft=400, n_train=3000, n_test=10, seed=3)
    pref = split_rows(d / "pref" / "train.jsonl")
    sft = split_rows(d / "sft" / "train.jsonl")
    assert len(pref) == 3000 and len(sft) == 400 and len(split_rows(d / "pref" / "test.jsonl")) == 10
    # the teacher writes even digits only; the SFT data uses all of 1-8
    assert all(re.fullmatch(r"( [2468]){8}", c) and re.fullmatch(r"( [2468]){8}", r) and c != r for _, c, r in pref)
    assert all(in_format(c) for _, c, _ in sft) and {ch for _, c, _ in sft for ch in c[1::2]} == set("12345678")
    assert {p for p, _, _ in pref[:50]} != {p for p, _, _ in sft[:50]}
    # the SFT data does not depend on how many pairs are written
    other = synthetic.write_task(tmp_path / "b", n_sft=400, n_train=7, n_test=10, seed=3)
    assert (other / "sft" / "train.jsonl").read_bytes() == (d / "sft" / "train.jsonl").read_bytes()
    by_gap: dict[int, list[bool]] = defaultdict(list)
    for _, chosen, rejected in pref:
        assert synthetic.reward(chosen) == gt_reward(chosen)
        gap = abs(gt_reward(chosen) - gt_reward(rejected))
        if gap:
            by_gap[gap].append(gt_reward(chosen) > gt_reward(rejected))
    for gap in (1, 2):  # P(the higher-reward response is chosen) = sigmoid(gap), within 4 standard errors
        hits = by_gap[gap]
        p = 1 / (1 + math.exp(-gap))
        assert abs(sum(hits) / len(hits) - p) < 4 * math.sqrt(p * (1 - p) / len(hits)), (gap, len(hits))
    for text in (" 5 6 7 8 1 2 3 4", " 5 6 7 8 1 2 3 4 5", " 5 6 7 8", "5 6 7 8 1 2 3 4", " 9 6 7 8 1 2 3 4", ""):
        assert synthetic.in_format(text) == in_format(text), text
    assert synthetic.even_fraction(" 2 4 6 8 1 3 5 7") == 0.5 and synthetic.even_fraction("none") == 0.0


def recorded_command() -> list[str]:
    line = (RECORDED / "reduced_command.txt").read_text().strip()
    assert line.startswith("python -m caldpo.eval.reproduce ") and "--out" not in line
    return shlex.split(line)[1:]


def body(table: str) -> str:
    """table.txt without its header (machine, time) and the plot's path."""
    text = table.split("\n\n", 1)[1]
    return text[:text.rindex("\n\nPlot: ")]


def test_reduced_reproduction_reproduces_the_recorded_table(tmp_path):
    """The recorded reduced command, rerun: the same table body to the last digit (same seed, same machine
    kind), and the numbers are what the run's own files say."""
    out = tmp_path / "rep"
    cmd = [sys.executable, *recorded_command(), "--out", str(out)]
    assert cmd[1:3] == ["-m", "caldpo.eval.reproduce"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "table.txt").read_text()
    assert table.strip() in proc.stdout
    assert body(table) == body((RECORDED / "reduced_table.txt").read_text())
    assert (out / "reward_dynamics.png").stat().st_size > 20_000
    report = json.loads((out / "report.json").read_text())
    res = report["results"][0]
    t = res["truncation"]
    assert t["prompts_cut"] == t["responses_cut"] == 0 and t["with_eos"] == t["responses"] > 0
    for name in ("sft", "dpo_beta0.1", "caldpo_beta0.1"):
        # the saved samples, rescored by this test's own scorer and format check, give the reported numbers
        saved = json.loads((out / "seed0" / name / "ground_truth_samples.json").read_text())
        assert [[gt_reward(x) for x in row["responses"]] for row in saved] == res["samples"][name]["rewards"]
        assert [[in_format(x) for x in row["responses"]] for row in saved] == res["samples"][name]["in_format"]
    for name in ("dpo_beta0.1", "caldpo_beta0.1"):
        records = [json.loads(x) for x in (out / "seed0" / name / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if r.get("split") == "eval"]
        train = [r for r in records if r.get("split") == "train" and "loss" in r]
        curve = res["curves"][name]
        assert [p["rewards/chosen"] for p in curve["eval"]] == [r["rewards/chosen"] for r in evals]
        assert len(curve["train"]) == len(train) and len(curve["eval"]) == 3
        half = train[-1]["examples"] / 2  # the late-training mean: the second half of the train batches
        late = [r["rewards/chosen"] for r in train if r["examples"] > half]
        assert abs(report["summary"]["runs"][name]["late_tc"][0] - sum(late) / len(late)) < 1e-12


def test_recorded_full_table_is_its_reports_numbers():
    """The committed full table's body is what ``summarise`` makes of the committed per-seed results."""
    report = json.loads((RECORDED / "report.json").read_text())
    text, _ = reproduce.summarise(report["results"], report["args"]["betas"])
    assert text == body((RECORDED / "table.txt").read_text())
    assert report["args"]["betas"] == [0.01, 0.1, 1.0] and len(report["args"]["seeds"]) == 3
