"""Fault injection: SIGKILL at every named point of a run, then rerun; corrupt each file kind of a run dir.

A killed-then-rerun run must end bit-identical to an uninterrupted one: the same metrics
records (each step once, no half lines), every tensor of ``LATEST/policy.pt`` equal, the
same ``DONE`` evaluations. Kill points are ``caldpo.train.faults.fault_point`` calls
selected with ``CALDPO_FAULT``; processes come from a fork server (tests/_runner.py) so that
the few dozen runs fit the suite's time budget.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from _runner import ForkServer

ARGS = ["model=tiny", "datasets=[sample]", "loss=caldpo", "n_examples=24", "batch_size=4", "max_length=64",
        "max_prompt_length=32", "optimizer=AdamW", "lr=1e-3", "warmup_steps=0", "save_every=2",
        "keep_checkpoints=2", "eval_every=12", "n_eval_examples=8", "eval_batch_size=8", "device=cpu",
        "export_hf=true"]
VOLATILE = ("time", "second", "memory", "mfu")
KILLED = -9  # waitstatus_to_exitcode of a SIGKILLed process


@pytest.fixture(scope="session")
def server():
    s = ForkServer()
    yield s
    s.close()


def merged(base: list[str], *extra: str) -> list[str]:
    """``base`` overrides with those of ``extra`` replacing the ones of the same key."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [a for a in base if a.split("=", 1)[0] not in keys] + list(extra)


def train(server, run_dir: Path, *extra: str, fault: str | None = None, env: dict | None = None,
          args: list[str] = ARGS, **kw) -> tuple[list[int], str]:
    """Run ``python -m caldpo.train`` (through the fork server) on ``run_dir``; (exit codes, logs joined)."""
    e = dict(env or {})
    if fault:
        e["CALDPO_FAULT"] = fault
    log = run_dir.parent / f"{run_dir.name}.{fault or 'run'}.log".replace(":", "_")
    codes, logs = server.run(merged(args, *extra, f"run_dir={run_dir}"), log, env=e, **kw)
    return codes, "\n".join(logs)


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]  # raises on a half-written line


def stable(rec: dict | None) -> dict:
    return {k: v for k, v in (rec or {}).items() if not any(w in k for w in VOLATILE)}


def assert_same_run(ref: Path, run: Path) -> None:
    """``run`` finished exactly as the uninterrupted ``ref``: metrics, policy.pt tensors, DONE evaluations."""
    a = [stable(r) for r in records(ref) if "loss" in r]
    b = [stable(r) for r in records(run) if "loss" in r]
    assert [(r["split"], r["step"]) for r in b] == [(r["split"], r["step"]) for r in a], "steps repeated or missing"
    for x, y in zip(a, b):
        assert x == y, (x["split"], x["step"], {k for k in x if x[k] != y.get(k)})
    pa = torch.load(ref / "LATEST" / "policy.pt", weights_only=True)
    pb = torch.load(run / "LATEST" / "policy.pt", weights_only=True)
    assert pa["step_idx"] == pb["step_idx"] and pa["state"].keys() == pb["state"].keys()
    for k, v in pa["state"].items():
        assert torch.equal(v, pb["state"][k]), k
    da, db = json.loads((ref / "DONE").read_text()), json.loads((run / "DONE").read_text())
    assert stable(da["eval_first"]) == stable(db["eval_first"]) and stable(da["eval_last"]) == stable(db["eval_last"])


@pytest.fixture(scope="session")
def baseline(server, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults") / "baseline"
    codes, log = train(server, run)
    assert codes == [0], log[-3000:]
    return run


# ----------------------------------------------------------------------------- kill, rerun, compare

POINTS = ["data_load", "mid_step:1", "mid_step:4", "save_dcp_written:4", "save_before_marker:4",
          "save_before_rename:4", "resave_aside:6", "resave_before_delete:6", "eval_policy_tmp", "policy_tmp",
          "hf_export", "before_done", "after_done"]


@pytest.mark.parametrize("point", POINTS)
def test_kill_then_rerun_matches_uninterrupted(server, baseline, tmp_path, point):
    run = tmp_path / "run"
    codes, log = train(server, run, fault=point)
    assert codes == [KILLED], log[-3000:]
    assert f"SIGKILL at {point}" in log
    codes, log = train(server, run)
    assert codes == [0], log[-3000:]
    assert_same_run(baseline, run)
    if point == "mid_step:1":
        assert "no checkpoint was completed" in log
    if point == "resave_aside:6":
        assert "resumed from" in log and "old_step_6" in log
    assert not list((run / "checkpoints").glob("tmp_step_*")) and not list((run / "checkpoints").glob("old_*"))


# two processes, FSDP2 over gloo: one rank killed, the server kills the other (as torchrun's agent does)

@pytest.fixture(scope="session")
def fsdp_baseline(server, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults_fsdp") / "baseline"
    codes, log = train(server, run, "trainer=FSDPTrainer", world=2)
    assert codes == [0, 0], log[-3000:]
    return run


@pytest.mark.parametrize("point, rank", [("mid_step:4", 1), ("save_before_marker:4", 0), ("resave_aside:6", 0)])
def test_fsdp_kill_one_rank_then_rerun_matches(server, fsdp_baseline, tmp_path, point, rank):
    run = tmp_path / "run"
    codes, log = train(server, run, "trainer=FSDPTrainer", fault=point, world=2,
                       env={"CALDPO_FAULT_RANK": rank})
    assert codes[rank] == KILLED and codes[1 - rank] != 0, log[-3000:]
    codes, log = train(server, run, "trainer=FSDPTrainer", world=2)
    assert codes == [0, 0], log[-3000:]
    assert_same_run(fsdp_baseline, run)


# ----------------------------------------------------------------------------- Ctrl-C, concurrent runs

def test_ctrl_c_checkpoints_at_step_boundary_and_resume_drops_later_records(server, baseline, tmp_path):
    run = tmp_path / "run"
    codes, log = train(server, run, fault="mid_step:3", env={"CALDPO_FAULT_SIGNAL": "INT"})
    assert codes == [130], log[-3000:]  # stopped, not finished: a chained command must not go on
    assert f"caldpo: stopped at step 3 (SIGINT); a resume checkpoint is in {run}" in log
    assert "SIGINT: checkpointing at the next step boundary" in log
    assert (run / "checkpoints" / "step_3" / "MANIFEST.json").is_file() and not (run / "DONE").exists()
    assert max(r["step"] for r in records(run) if "loss" in r) == 3
    codes, log = train(server, run)
    assert codes == [0] and "resumed from" in log
    assert_same_run(baseline, run)


def test_second_ctrl_c_exits_at_once(server, baseline, tmp_path):
    run = tmp_path / "run"
    codes, log = train(server, run, fault="mid_step:3", env={"CALDPO_FAULT_SIGNAL": "INT,INT"})
    assert codes == [130] and "second interrupt" in log
    assert not (run / "checkpoints" / "step_3").exists()
    codes, _ = train(server, run)
    assert codes == [0]
    assert_same_run(baseline, run)


def test_two_runs_on_one_run_dir_one_refuses(server, baseline, tmp_path):
    run = tmp_path / "run"
    codes, log = train(server, run, parallel=2, linked=False)
    assert sorted(codes) == [0, 2], log[-3000:]
    assert f"run_dir {run} is in use by pid" in log
    lock = json.loads((run / ".lock").read_text())
    assert lock["pid"] > 0 and "host" in lock
    assert_same_run(baseline, run)


# ----------------------------------------------------------------------------- damaged resume checkpoints

@pytest.fixture(scope="session")
def interrupted(server, tmp_path_factory) -> Path:
    """A run killed in step 5: complete checkpoints step_2 and step_4, metrics of steps 1-4."""
    run = tmp_path_factory.mktemp("interrupted") / "run"
    codes, log = train(server, run, fault="mid_step:5")
    assert codes == [KILLED], log[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4"]
    return run


def _zero_middle(path: Path, n: int = 4096) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(max(0, size // 2 - n // 2))
        f.write(b"\0" * min(n, size))


def _truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


class _Payload:
    """Unpickling runs ``touch <marker>`` and then yields the genuine object (so a careless loader succeeds)."""

    def __init__(self, obj, marker: Path):
        self.obj, self.marker = obj, marker

    def __reduce__(self):
        return (eval, (f"(__import__('pathlib').Path({str(self.marker)!r}).touch(), obj)[1]", {"obj": self.obj}))


def _plant(path: Path, marker: Path) -> None:
    if path.name == ".metadata":
        obj = pickle.loads(path.read_bytes())
        path.write_bytes(pickle.dumps(_Payload(obj, marker)))
    else:
        torch.save(_Payload(torch.load(path, weights_only=True), marker), path)


CORRUPTIONS = {
    "shard_zeroed": lambda s, m: _zero_middle(s / "__0_0.distcp"),
    "shard_truncated": lambda s, m: _truncate_half(s / "__0_0.distcp"),
    "metadata_deleted": lambda s, m: (s / ".metadata").unlink(),
    "metadata_pickle": lambda s, m: _plant(s / ".metadata", m),
    "trainer_state_empty": lambda s, m: (s / "trainer_state.pt").write_bytes(b""),
    "trainer_state_pickle": lambda s, m: _plant(s / "trainer_state.pt", m),
    "rng_truncated": lambda s, m: _truncate_half(s / "rng_rank0.pt"),
    "manifest_deleted": lambda s, m: (s / "MANIFEST.json").unlink(),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_damaged_checkpoint_is_named_and_the_previous_one_used(server, baseline, interrupted, tmp_path, kind):
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    marker = tmp_path / "PWNED"
    CORRUPTIONS[kind](run / "checkpoints" / "step_4", marker)
    codes, log = train(server, run)
    assert codes == [0], log[-3000:]
    assert "checkpoint" in log and "step_4 is damaged" in log and "resumed from" in log and "step_2" in log
    assert not marker.exists(), "a planted pickle ran code"
    assert (run / "checkpoints" / "damaged_step_4").is_dir()
    assert_same_run(baseline, run)


def _plant_dotted(path: Path, marker: Path) -> None:
    """The issue's payload: protocol 4's STACK_GLOBAL with the module DCP's metadata lives in and the dotted
    name ``os.system`` (resolved by attribute traversal: that module imports os)."""
    def s(x: str) -> bytes:
        return b"\x8c" + bytes([len(x.encode())]) + x.encode()
    path.write_bytes(b"\x80\x04" + s("torch.distributed.checkpoint.metadata") + s("os.system") + b"\x93("
                     + s(f"touch {marker}") + b"tR.")


@pytest.mark.parametrize("target,payload", [("trainer_state.pt", "reduce"), (".metadata", "reduce"),
                                            (".metadata", "dotted_global")])
def test_planted_pickle_with_a_matching_manifest_is_refused(server, interrupted, tmp_path, target, payload):
    """Whoever can rewrite the manifest too is trusted (README); still, no code runs and the file is named."""
    from caldpo.train.checkpoint import MANIFEST, sha256_file
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    step = run / "checkpoints" / "step_4"
    marker = tmp_path / "PWNED"
    (_plant_dotted if payload == "dotted_global" else _plant)(step / target, marker)
    man = json.loads((step / MANIFEST).read_text())
    man["files"][target] = {"size": (step / target).stat().st_size, "sha256": sha256_file(step / target)}
    (step / MANIFEST).write_text(json.dumps(man))
    before = (run / "metrics.jsonl").read_text()
    codes, log = train(server, run)
    assert codes == [2], log[-3000:]
    assert target in log.strip().splitlines()[-1] and not marker.exists()
    assert (run / "metrics.jsonl").read_text() == before


def test_all_checkpoints_damaged_refuses_and_changes_nothing(server, interrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    for s in ("step_2", "step_4"):
        _zero_middle(run / "checkpoints" / s / "__0_0.distcp")
    before = (run / "metrics.jsonl").read_text()
    codes, log = train(server, run)
    assert codes == [2]
    last = log.strip().splitlines()[-1]
    assert "no usable checkpoint" in last and "step_2" in last and "step_4" in last and "__0_0.distcp" in last
    assert (run / "metrics.jsonl").read_text() == before
    assert "Traceback" not in log


def test_half_written_metrics_line_is_repaired(server, baseline, interrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 5, "examples": 20, "loss": 41.9')
    codes, log = train(server, run)
    assert codes == [0] and "half-written last line" in log
    assert_same_run(baseline, run)


# ----------------------------------------------------------------------------- model.archive

@pytest.mark.parametrize("damage", ["truncated", "zeroed_with_manifest", "zeroed_alone", "not_a_checkpoint"])
def test_damaged_archive_is_a_config_error_naming_the_file(server, baseline, tmp_path, damage):
    latest = tmp_path / "LATEST"
    shutil.copytree(baseline / "LATEST", latest)
    archive = latest / "policy.pt"
    if damage == "truncated":
        _truncate_half(archive)
    elif damage == "zeroed_with_manifest":
        _zero_middle(archive)
    elif damage == "zeroed_alone":
        archive = tmp_path / "copied.pt"
        shutil.copy(latest / "policy.pt", archive)
        _zero_middle(archive)
    else:
        archive = tmp_path / "notes.pt"
        archive.write_text("not a checkpoint\n")
    codes, log = train(server, tmp_path / "run", f"model.archive={archive}", "n_examples=4")
    last = log.strip().splitlines()[-1]
    assert codes == [2] and last.startswith("caldpo: config error: model.archive=") and str(archive) in last
    assert "Traceback" not in log
    reason = {"truncated": "truncated", "zeroed_with_manifest": "sha256", "zeroed_alone": "CRC",
              "not_a_checkpoint": "not a torch.save"}[damage]
    assert reason in last


# ----------------------------------------------------------------------------- non-finite training

def test_nonfinite_training_stops_without_saving_or_exporting_it(server, tmp_path):
    run = tmp_path / "run"
    codes, log = train(server, run, "lr=1e3", "save_every=1", "max_nonfinite_steps=2", "export_hf=false")
    assert codes == [3], log[-3000:]
    last = log.strip().splitlines()[-1]
    assert "non-finite" in last and "max_nonfinite_steps=2" in last and "Batch examples" in last
    train_recs = [r for r in records(run) if r.get("split") == "train" and "loss" in r]
    bad = [r for r in train_recs if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]))]
    assert len(bad) == 2 and bad[-1]["step"] == train_recs[-1]["step"] and bad[-1]["skipped_nonfinite"] == 2
    assert f"step {bad[-1]['step']}:" in last
    named = re.match(r"caldpo: .*?step \d+: non-finite ([^;(]+)", last).group(1).strip().split(", ")
    assert named and all(not math.isfinite(float(kv.split("=")[1])) for kv in named), last  # only those
    assert not (run / "LATEST").exists() and not (run / "DONE").exists()
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    for step in (run / "checkpoints").glob("step_*"):
        dcp_to_torch_save(step, tmp_path / "sd.pt")
        sd = torch.load(tmp_path / "sd.pt", weights_only=False)["model"]  # our own file, just written
        assert all(torch.isfinite(v).all() for v in sd.values() if torch.is_tensor(v) and v.is_floating_point())


# ----------------------------------------------------------------------------- data changed under a resumable run

@pytest.fixture
def interrupted_on_own_data(server, tmp_path) -> tuple[Path, Path]:
    """(run killed in step 5 with checkpoints step_2 and step_4, its data folder: a copy of the sample).
    One per test: the data path is part of the run's identity, so each test edits its own copy in place."""
    from caldpo.train.data import SAMPLE_DIR
    shutil.copytree(SAMPLE_DIR, tmp_path / "data")
    codes, log = train(server, tmp_path / "run", f"data.paths.sample={tmp_path / 'data'}", fault="mid_step:5")
    assert codes == [KILLED], log[-3000:]
    return tmp_path / "run", tmp_path / "data"


def _rows(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


DATA_CHANGES = {  # change -> (split, edit of that split's lines, what the line says of the counts)
    "train rows reordered": ("train", lambda ls: ls[1:] + ls[:1], "but their content or order differs"),
    "train rows added": ("train", lambda ls: ls + ls[:50], "examples at the checkpoint, "),
    "test row edited": ("test", lambda ls: [_edited(ls[0])] + ls[1:], "but their content or order differs"),
}


def _edited(line: str) -> str:
    row = json.loads(line)
    row["chosen"] += " Indeed."
    return json.dumps(row) + "\n"


@pytest.mark.parametrize("change", sorted(DATA_CHANGES))
def test_resume_after_the_data_changed_is_refused_naming_the_split_and_file(server, interrupted_on_own_data, change):
    """The data position is a count into the examples' order: resuming on changed rows would silently train on
    others. Refused (exit 2, nothing changed), unless data.on_change=continue, which resumes with a warning."""
    run, data = interrupted_on_own_data
    split, edit, says = DATA_CHANGES[change]
    file = data / f"{split}.jsonl"
    file.write_text("".join(edit(_rows(file))))
    before = (run / "metrics.jsonl").read_text()
    codes, log = train(server, run, f"data.paths.sample={data}")
    last = log.strip().splitlines()[-1]
    assert codes == [2] and "Traceback" not in log and "resumed from" not in log, log[-3000:]
    assert last.startswith(f"caldpo: cannot resume {run} from checkpoint step_4: the data changed since it was written: "
                           f"the {split} split (sample: {file}): ")
    assert says in last and "data.on_change=continue" in last and last.count("split (") == 1
    assert (run / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4"]

    codes, log = train(server, run, f"data.paths.sample={data}", "data.on_change=continue")
    assert codes == [0], log[-3000:]
    assert "resumed from" in log and f"the {split} split (sample: {file})" in log
    assert "resuming on the changed data (data.on_change=continue)" in log


def test_resume_on_unchanged_data_is_not_refused(server, interrupted_on_own_data):
    run, data = interrupted_on_own_data
    codes, log = train(server, run, f"data.paths.sample={data}")
    assert codes == [0] and "resumed from" in log and "data changed" not in log, log[-3000:]
    # the resume marker has a split of its own: each train step once among the "train" records
    recs = records(run)
    assert [r["split"] for r in recs if "resumed_from_step" in r] == ["resume"]
    steps = [r["step"] for r in recs if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 6


# ----------------------------------------------------------------------------- reference log-prob cache

@pytest.fixture(scope="session")
def ref_cache_run(server, tmp_path_factory):
    from caldpo.train.data import SAMPLE_DIR
    root = tmp_path_factory.mktemp("refcache")
    data = root / "data"
    shutil.copytree(SAMPLE_DIR, data)
    args = merged(ARGS, "loss=dpo", "n_examples=8", f"data.paths.sample={data}", "reference.mode=cache",
                  f"reference.cache_dir={root / 'cache'}", "do_first_eval=false", "export_hf=false")
    codes, log = train(server, root / "first", args=args)
    assert codes == [0], log[-3000:]
    return root, args


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "non_finite"])
def test_damaged_reference_cache_is_recomputed(server, ref_cache_run, tmp_path, damage):
    root, args = ref_cache_run
    cache = root / "cache"
    (file,) = list(cache.glob("ref_logps_*.pt"))
    if damage == "truncated":
        _truncate_half(file)
    elif damage == "zeroed":
        _zero_middle(file, 64)
    else:
        blob = torch.load(file, weights_only=True)
        blob["train"][0, 0] = float("nan")
        torch.save(blob, file)
    codes, log = train(server, tmp_path / "run", args=args)
    assert codes == [0], log[-3000:]
    assert "is unusable" in log and "recomputing" in log
    a = [stable(r) for r in records(root / "first") if "loss" in r]
    b = [stable(r) for r in records(tmp_path / "run") if "loss" in r]
    assert a == b
    assert list(cache.glob("ref_logps_*.pt")) == [file]


def test_reference_cache_key_follows_the_data_content(server, ref_cache_run, tmp_path):
    """The data file edited in place (same path, same row count): a new cache, and at step 1 the policy equals
    the reference (no archive), so the DPO loss is ln 2 and the rewards 0."""
    root, args = ref_cache_run
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    for r in rows:
        r["chosen"] = r["chosen"].rstrip() + " Indeed."
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache)
    codes, log = train(server, tmp_path / "run", f"data.paths.sample={data}", f"reference.cache_dir={cache}",
                       args=args)
    assert codes == [0], log[-3000:]
    assert len(list(cache.glob("ref_logps_*.pt"))) == 2
    first = next(r for r in records(tmp_path / "run") if r.get("split") == "train" and "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)


def test_broken_data_row_is_one_line_with_exit_2(server, tmp_path):
    from caldpo.train.data import SAMPLE_DIR
    data = tmp_path / "data"
    shutil.copytree(SAMPLE_DIR, data)
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[6] = lines[6][: len(lines[6]) // 2]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    codes, log = train(server, tmp_path / "run", f"data.paths.sample={data}")
    last = log.strip().splitlines()[-1]
    assert codes == [2] and last.startswith("caldpo: data error:") and "train.jsonl:7" in last
    assert "Traceback" not in log
