"""What a run leaves for the authors' users: step-<examples>/policy.pt exports at each evaluation,
the authors' metric names in TensorBoard and W&B, and the reference model's precision under FSDP."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from conftest import REPO, TINY, run_train
from caldpo.train.metrics import MetricsWriter, dashboard_scalars

# The authors' names (Mitchell et al.'s DPO trainers.py as the Cal-DPO code uses it), written out here
# independently of caldpo.train.metrics.AUTHORS_NAMES.
AUTHORS_TRAIN = {"rewards_train/chosen": "rewards/chosen", "rewards_train/rejected": "rewards/rejected",
                 "rewards_train/accuracies": "rewards/accuracies", "rewards_train/margins": "rewards/margins",
                 "logps_train/chosen": "logps/chosen", "logps_train/rejected": "logps/rejected",
                 "loss/train": "loss", "dpo_loss/train": "loss/preference", "reg_loss/train": "loss/calibration",
                 "grad_norm": "grad_norm", "counters/examples": "examples", "counters/updates": "step"}
AUTHORS_EVAL = {"rewards_eval/chosen": "rewards/chosen", "rewards_eval/rejected": "rewards/rejected",
                "rewards_eval/accuracies": "rewards/accuracies", "rewards_eval/margins": "rewards/margins",
                "logps_eval/chosen": "logps/chosen", "logps_eval/rejected": "logps/rejected",
                "loss/eval": "loss", "dpo_loss/eval": "loss/preference", "reg_loss/eval": "loss/calibration"}


def _train_record(**extra) -> dict:
    rec = {"split": "train", "step": 3, "examples": 24, "step_time": 0.5, "lr": 1e-3, "tokens_per_second": 900.0,
           "skipped_nonfinite": 0, "flag": True}
    rec.update({ours: float(i) for i, ours in enumerate(AUTHORS_TRAIN.values()) if ours not in ("examples", "step")})
    rec.update(extra)
    return rec


def test_dashboard_names_are_the_authors():
    scalars, step = dashboard_scalars(_train_record(), batch_size=8)
    rec = _train_record()
    assert step == 24  # the authors' W&B step is the example counter
    for theirs, ours in AUTHORS_TRAIN.items():
        assert scalars[theirs] == rec[ours], theirs
    assert scalars["examples_per_second"] == 8 / 0.5
    assert scalars["train/lr"] == 1e-3 and scalars["train/tokens_per_second"] == 900.0  # no authors' name: kept
    assert "train/flag" not in scalars and "train/step_time" in scalars
    assert not any(k.startswith(("rewards/", "logps/")) or k == "loss" for k in scalars)
    ev = {"split": "eval", "step": 3, "examples": 24, "eval_seconds": 2.0,
          **{ours: float(i) for i, ours in enumerate(AUTHORS_EVAL.values())}}
    scalars, step = dashboard_scalars(ev, batch_size=8)
    assert step == 24
    assert {k: scalars[k] for k in AUTHORS_EVAL} == {k: ev[v] for k, v in AUTHORS_EVAL.items()}
    assert set(scalars) == set(AUTHORS_EVAL) | {"eval/eval_seconds"}  # no counters, grad norm or rate in eval
    # a resumed run's marker is no metric: nothing is drawn (before, it drew counters at an earlier step)
    assert dashboard_scalars({"split": "resume", "resumed_from_step": 3, "step": 3, "examples": 24}, 8) == ({}, 24)


def test_wandb_gets_the_authors_names(tmp_path, monkeypatch):
    """A stand-in ``wandb`` module records init and log calls; metrics.jsonl keeps caldpo's names."""
    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or fake
    fake.log = lambda data, step: calls.append(("log", data, step))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = types.SimpleNamespace(tensorboard=False, batch_size=8, exp_name="caldpo_tiny",
                                wandb=types.SimpleNamespace(enabled=True, project="p", entity=None))
    monkeypatch.setattr("caldpo.train.metrics.OmegaConf.to_container", lambda c, resolve: {"batch_size": 8})
    writer = MetricsWriter(tmp_path, cfg, enabled=True)
    writer.write(_train_record())
    writer.close()
    assert calls[0][0] == "init" and calls[0][1]["name"] == "caldpo_tiny"
    (_, data, step), = [c for c in calls if c[0] == "log"]
    assert step == 24 and data["rewards_train/accuracies"] == _train_record()["rewards/accuracies"]
    assert data["examples_per_second"] == 16.0 and calls[-1] == ("finish",)
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert "rewards/accuracies" in line and "rewards_train/accuracies" not in line


def _scalars(tb_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_eval_exports_and_tensorboard_names(tmp_path):
    """eval_every=16 over 48 examples: evaluations at 0, 16, 32 and the end. Exports at 16 and 32
    (not at 0, not at the end: LATEST), keep_eval_exports=1 leaves step-32; TensorBoard holds the
    authors' names at step = examples, equal to the metrics.jsonl values."""
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    run_train([*TINY, "loss=caldpo", "loss.beta=0.1", f"run_dir={run_dir}", "n_examples=48", "batch_size=8",
               "eval_every=16", "lr=1e-3", "optimizer=AdamW", "export_hf=false", "tensorboard=true",
               "keep_eval_exports=1"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["examples"]: r for r in records if r.get("split") == "eval"}
    assert sorted(evals) == [0, 16, 32, 48]
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-32"]  # step-16 written, then pruned
    blob = torch.load(run_dir / "step-32" / "policy.pt", map_location="cpu", weights_only=True)
    assert set(blob) == {"step_idx", "state", "metrics"} and blob["step_idx"] == 32
    assert blob["metrics"]["loss"] == pytest.approx(evals[32]["loss"])
    latest = torch.load(run_dir / "LATEST" / "policy.pt", map_location="cpu", weights_only=True)["state"]
    assert blob["state"].keys() == latest.keys()
    assert any(not torch.equal(blob["state"][k], latest[k]) for k in latest)  # 16 more examples trained since

    tb = _scalars(run_dir / "tb")
    missing = [k for k in (*AUTHORS_TRAIN, *AUTHORS_EVAL, "examples_per_second") if k not in tb]
    assert not missing, f"TensorBoard lacks {missing}; has {sorted(tb)}"
    train = {r["examples"]: r for r in records if r.get("split") == "train" and "loss" in r}
    for theirs, ours in AUTHORS_TRAIN.items():
        assert tb[theirs] == pytest.approx({e: float(r[ours]) for e, r in train.items()}, rel=1e-6), theirs
    for theirs, ours in AUTHORS_EVAL.items():
        assert tb[theirs] == pytest.approx({e: float(r[ours]) for e, r in evals.items()}, rel=1e-6), theirs
    assert tb["examples_per_second"] == pytest.approx({e: 8 / r["step_time"] for e, r in train.items()}, rel=1e-5)


REFERENCE_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from caldpo.train.trainer import main, Trainer

    seen = {}

    def watch(model, name):
        lin = next(m for m in model.lm.modules() if isinstance(m, torch.nn.Linear))
        def hook(mod, args, out):
            seen.setdefault(name, set()).add((str(mod.weight.dtype), str(out.dtype)))
        lin.register_forward_hook(hook)

    init = Trainer.__init__
    def patched(self, *a, **kw):
        init(self, *a, **kw)
        watch(self.policy, "policy")
        watch(self.reference, "reference")
        seen["reference_params"] = {str(p.dtype) for p in self.reference.parameters()}
        seen["reference_sharded"] = all(type(p).__name__ == "DTensor" for p in self.reference.parameters())
    Trainer.__init__ = patched
    main(sys.argv[1:])
    print("DTYPES " + json.dumps({k: sorted(map(list, v)) if k in ("policy", "reference") else
                                  (sorted(v) if isinstance(v, set) else v) for k, v in seen.items()}))
""")


def test_reference_runs_at_reference_dtype_under_fsdp(tmp_path):
    """FSDPTrainer, one CPU process, the authors' Pythia precision (fp16 reference, bf16 policy
    mixed precision): the policy computes under the bf16 MixedPrecisionPolicy; the reference is
    not under it and keeps the dtype it was loaded in, reference_dtype float16, which on CPU is
    float32 with a log line. Also export_at_eval=false: no step-* folder although evaluations
    ran mid-training."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", REFERENCE_SCRIPT, *TINY, "trainer=FSDPTrainer", "loss=dpo", "loss.beta=0.1",
         f"run_dir={run_dir}", "n_examples=16", "batch_size=8", "eval_every=8", "model.policy_dtype=float32",
         "model.reference_dtype=float16", "model.fsdp_policy_mp=bfloat16", "export_at_eval=false",
         "export_hf=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    seen = json.loads(proc.stdout.split("DTYPES ", 1)[1].splitlines()[0])
    assert seen["policy"] == [["torch.bfloat16", "torch.bfloat16"]]  # the mixed-precision policy applies
    assert seen["reference"] == [["torch.float32", "torch.float32"]]  # ... but not to the reference
    assert seen["reference_params"] == ["torch.float32"] and seen["reference_sharded"]
    assert "reference_dtype float16 is slow on CPU: the reference runs in float32" in proc.stdout + proc.stderr
    evals = [json.loads(line)["examples"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals == [0, 8, 16] and not list(run_dir.glob("step-*"))
    assert math.isfinite(json.loads((run_dir / "DONE").read_text())["eval_last"]["loss"])
