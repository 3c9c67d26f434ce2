"""The Cal-DPO authors' workflow as their users run it: run identity, resume, the printed archive path.

The seed's commands are run verbatim (``python -u train.py`` -> ``python -m caldpo.train``),
with the tiny settings of conftest.TINY and a run root appended.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from conftest import TINY, read_metrics, run_train

# The seed README's two commands (SFT, then the preference run from the SFT archive), verbatim.
SEED_SFT = ("model=pythia28 datasets=[hh] loss=sft exp_name=anthropic_dpo_pythia28 gradient_accumulation_steps=2 "
            "batch_size=64 eval_batch_size=32 trainer=FSDPTrainer sample_during_eval=false "
            "model.fsdp_policy_mp=bfloat16").split()
SEED_PREF = ("model=pythia28 datasets=[hh] loss=dpo loss.beta=0.1 model.archive=/path/to/archive/from/sft/LATEST/policy.pt "
             "exp_name=anthropic_dpo_pythia28 gradient_accumulation_steps=2 batch_size=64 eval_batch_size=32 "
             "trainer=FSDPTrainer sample_during_eval=false model.fsdp_policy_mp=bfloat16").split()
# Appended: the tiny model on the shipped sample, a small global batch, 2 steps, fp32 (bf16 is slow on CPU).
SMALL = [*TINY, "batch_size=8", "n_examples=16", "n_eval_examples=16", "model.fsdp_policy_mp=null", "lr=1e-4"]


def printed_archive(stdout: str) -> Path:
    found = re.findall(r"model\.archive=(\S+)", stdout)
    assert found, stdout[-2000:]
    return Path(found[-1])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_archive(cmd: list[str], archive: Path, loss: str | None = None) -> list[str]:
    out = [f"model.archive={archive}" if a.startswith("model.archive=") else a for a in cmd]
    return [f"loss={loss}" if loss and a.startswith("loss=") else a for a in out]


def test_seed_commands_train_sft_then_cal_dpo(tmp_path):
    root = [f"local_run_root={tmp_path / 'runs'}"]
    sft = run_train([*SEED_SFT, *SMALL, *root])
    sft_policy = printed_archive(sft.stdout)
    sft_dir = sft_policy.parent.parent
    assert sft_policy.is_file() and sft_dir.parent == tmp_path / "runs"
    assert sft_dir.name.startswith("anthropic_dpo_pythia28_")
    before = {p: digest(sft_dir / p) for p in ("LATEST/policy.pt", "config.yaml", "DONE", "metrics.jsonl")}

    # The seed's Cal-DPO line names loss=dpo (plain DPO in the authors' code); Cal-DPO is loss=cal_dpo.
    cal = run_train([*with_archive(SEED_PREF, sft_policy, loss="cal_dpo"), *SMALL, *root])
    assert "already finished" not in cal.stdout + cal.stderr
    cal_policy = printed_archive(cal.stdout)
    cal_dir = cal_policy.parent.parent
    assert cal_dir != sft_dir and cal_dir.name.startswith("anthropic_dpo_pythia28_") and cal_policy.is_file()
    steps = read_metrics(cal_dir)
    assert [r["step"] for r in steps] == [1, 2]
    assert all("loss/calibration" in r and "rewards/accuracies" in r for r in steps)
    stored = (cal_dir / "config.yaml").read_text()
    assert "name: cal_dpo" in stored and "shift: 0.5" in stored and str(sft_policy) in stored
    # The SFT run is untouched: not resumed into, not skipped, not overwritten.
    assert {p: digest(sft_dir / p) for p in before} == before
    assert "name: sft" in (sft_dir / "config.yaml").read_text()

    # The seed's own line (loss=dpo) trains plain DPO in a directory of its own and says where Cal-DPO is.
    dpo = run_train([*with_archive(SEED_PREF, sft_policy), *SMALL, *root])
    notes = [line for line in dpo.stdout.splitlines() if "Cal-DPO is loss=caldpo" in line]
    assert len(notes) == 1 and "loss=cal_dpo" in notes[0]
    assert printed_archive(dpo.stdout).parent.parent not in (sft_dir, cal_dir)

    # The identical command again: the finished run is reported, with its archive path, and not retrained.
    again = run_train([*with_archive(SEED_PREF, sft_policy, loss="cal_dpo"), *SMALL, *root])
    assert "already finished" in again.stdout + again.stderr and printed_archive(again.stdout) == cal_policy
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        {sft_dir.name, cal_dir.name, printed_archive(dpo.stdout).parent.parent.name})


def test_identical_command_resumes_changed_option_does_not(tmp_path):
    """pytorch/examples#816: a rerun with another lr must not resume with the checkpoint's lr."""
    from caldpo.train.config import load_config, run_dir

    args = [*TINY, "loss=sft", "batch_size=4", "n_examples=12", "optimizer=AdamW", "lr=1e-3",
            f"local_run_root={tmp_path}"]
    first = run_dir(load_config(args))
    first.mkdir(parents=True)
    (first / "STOP").touch()
    assert run_train(args, check=False).returncode == 75  # stops after step 1 with a resume checkpoint
    assert not (first / "DONE").exists() and [r["step"] for r in read_metrics(first)] == [1]
    config_yaml = (first / "config.yaml").read_text()

    # Another lr with an explicit run_dir holding the run: stops before any work, listing the difference.
    explicit = run_train([*args, "lr=1e-5", f"run_dir={first}"], check=False)
    assert explicit.returncode == 2, explicit.stderr
    assert "lr: 0.001 -> 1e-05" in explicit.stderr
    assert (first / "config.yaml").read_text() == config_yaml and [r["step"] for r in read_metrics(first)] == [1]

    # Another lr without run_dir: a run of its own, from step 1, at its own lr.
    other = run_train([*args, "lr=1e-5"])
    other_dir = printed_archive(other.stdout).parent.parent
    assert other_dir != first and "resumed" not in other.stdout + other.stderr
    assert [r["lr"] for r in read_metrics(other_dir)] == [1e-5] * 3

    # The identical command resumes the stopped run at its own lr; its config.yaml is unchanged.
    same = run_train(args)
    assert printed_archive(same.stdout).parent.parent == first.resolve()
    assert [json.loads(line).get("resumed_from_step") for line in (first / "metrics.jsonl").read_text().splitlines()
            if "resumed_from_step" in line] == [1]
    assert [(r["step"], r["lr"]) for r in read_metrics(first)] == [(1, 1e-3), (2, 1e-3), (3, 1e-3)]
    assert (first / "config.yaml").read_text() == config_yaml
