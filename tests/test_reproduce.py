"""The synthetic ground-truth task and a reduced run of ``python -m caldpo.eval.reproduce``."""
from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from caldpo.eval import synthetic

REPO = Path(__file__).resolve().parents[1]


def gt_reward(text: str) -> int:
    """The task's ground truth, written independently: digits 5-8 among the first 8 digits."""
    digits = [c for c in text if c.isdigit()][:8]
    return sum(c in "5678" for c in digits)


def test_task_rows_are_hh_and_labelled_by_bradley_terry(tmp_path):
    d = synthetic.write_task(tmp_path, n_train=3000, n_test=10, seed=3)
    rows = [json.loads(x) for x in (d / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 3000 and len((d / "test.jsonl").read_text().splitlines()) == 10
    by_gap: dict[int, list[bool]] = defaultdict(list)
    for r in rows:
        cut = r["chosen"].rindex("\n\nAssistant:") + len("\n\nAssistant:")
        prompt, chosen, rejected = r["chosen"][:cut], r["chosen"][cut:], r["rejected"][cut:]
        assert r["chosen"].startswith("\n\nHuman: ") and r["rejected"][:cut] == prompt and chosen != rejected
        assert re.fullmatch(r"( [1-8]){8}", chosen) and re.fullmatch(r"( [1-8]){8}", rejected)
        assert synthetic.reward(chosen) == gt_reward(chosen)
        gap = abs(gt_reward(chosen) - gt_reward(rejected))
        if gap:
            by_gap[gap].append(gt_reward(chosen) > gt_reward(rejected))
    for gap in (1, 2):  # P(the higher-reward response is chosen) = sigmoid(gap), within 4 standard errors
        hits = by_gap[gap]
        p = 1 / (1 + math.exp(-gap))
        assert abs(sum(hits) / len(hits) - p) < 4 * math.sqrt(p * (1 - p) / len(hits)), (gap, len(hits))
    rng = random.Random(0)
    assert synthetic.reward(" 5 6 7 8 1 2 3 4 5 5") == 4 and synthetic.reward(synthetic.response_text(rng)) <= 8


def test_reduced_reproduction_prints_the_table_and_writes_the_plot(tmp_path):
    out = tmp_path / "rep"
    cmd = [sys.executable, "-m", "caldpo.eval.reproduce", "--out", str(out), "--seeds", "0", "--n-train", "256",
           "--n-test", "16", "--sft-epochs", "2", "--epochs", "1", "--n-evals", "2", "--prompts", "6",
           "--samples", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    for needle in ("Eval rewards (beta*h", "GT reward of samples", "win rate vs SFT", "The claim, part by part",
                   "1. DPO", "2. Cal-DPO", "3. Cal-DPO at least as good"):
        assert needle in table, needle
    assert (out / "table.txt").read_text().strip() in table
    png = out / "reward_dynamics.png"
    assert png.stat().st_size > 20_000
    report = json.loads((out / "report.json").read_text())
    res = report["results"][0]
    summ = report["summary"]["losses"]
    for loss in ("dpo", "caldpo"):
        # the saved samples, rescored by this test's own scorer, give the reported rewards and counts
        saved = json.loads((out / "seed0" / loss / "ground_truth_samples.json").read_text())
        assert [[gt_reward(x) for x in row["responses"]] for row in saved] == res["rewards"][loss]
        sft = res["rewards"]["sft"]
        pairs = [(x, y) for a, b in zip(res["rewards"][loss], sft) for x, y in zip(a, b)]
        assert len(pairs) == 12
        assert (summ[loss]["wins"], summ[loss]["ties"], summ[loss]["losses"]) == (
            sum(x > y for x, y in pairs), sum(x == y for x, y in pairs), sum(x < y for x, y in pairs))
        flat = [x for row in res["rewards"][loss] for x in row]
        assert any(flat)  # SFT taught the format: some digits 5-8 appear, the rescoring check has teeth
        assert abs(summ[loss]["gt_reward"] - sum(flat) / len(flat)) < 1e-12
        # the curve is the run's own eval records
        evals = [json.loads(x) for x in (out / "seed0" / loss / "metrics.jsonl").read_text().splitlines()]
        evals = [e for e in evals if e.get("split") == "eval"]
        assert res["curves"][loss][-1]["rewards/chosen"] == evals[-1]["rewards/chosen"]
        assert "calibration/h_chosen" in evals[-1] and "rewards/chosen_positive" in evals[-1]
        # the ground truth at every evaluation: SFT's at the start, the final policy's at the end
        curve = res["curves"][loss]
        assert len(curve) == 3 and all("gt_reward" in p for p in curve)
        assert curve[0]["gt_reward"] == sum(map(sum, sft)) / 12 and curve[-1]["gt_reward"] == sum(flat) / len(flat)
