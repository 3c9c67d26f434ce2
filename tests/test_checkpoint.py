"""Resume checkpoints in one process: manifest, verification, fallback order, atomic re-save, safe loading."""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch

from caldpo.train import checkpoint as ckpt
from caldpo.train.metrics import prepare_jsonl


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _save(root: Path, step: int, seed: int = 0, keep: int = 2) -> Path:
    model, opt, sched = _model(seed)
    return ckpt.save_resume(root, step, model, opt, sched, {"examples_seen": step * 4, "next_eval": 8}, keep=keep)


def test_save_writes_a_manifest_of_every_file_last(tmp_path):
    path = _save(tmp_path, 3)
    man = json.loads((path / ckpt.MANIFEST).read_text())
    on_disk = sorted(p.name for p in path.iterdir() if p.name != ckpt.MANIFEST)
    assert sorted(man["files"]) == on_disk and {".metadata", "trainer_state.pt", "rng_rank0.pt"} <= set(on_disk)
    for name, entry in man["files"].items():
        assert entry["size"] == (path / name).stat().st_size
        assert entry["sha256"] == ckpt.sha256_file(path / name)
    assert ckpt.verify_checkpoint(path) is None
    assert not list(tmp_path.glob("tmp_step_*"))


def test_load_restores_model_optimizer_scheduler_and_rng_with_weights_only(tmp_path):
    random.seed(5)
    torch.manual_seed(7)
    path = _save(tmp_path, 3, seed=1)
    expect_py, expect_torch = random.random(), torch.rand(3)
    ref, ref_opt, ref_sched = _model(seed=1)
    model, opt, sched = _model(seed=2)
    random.seed(0)
    state = ckpt.load_resume(path, model, opt, sched)
    assert state["step"] == 3 and state["examples_seen"] == 12
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert sched.state_dict()["last_epoch"] == ref_sched.state_dict()["last_epoch"]
    assert random.random() == expect_py and torch.equal(torch.rand(3), expect_torch)
    for name in ("trainer_state.pt", "rng_rank0.pt"):  # plain types and tensors only
        torch.load(path / name, weights_only=True)


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / "__0_0.distcp").write_bytes(b"\0" * (p / "__0_0.distcp").stat().st_size), "sha256"),
    (lambda p: os.truncate(p / "trainer_state.pt", 10), "truncated"),
    (lambda p: (p / "rng_rank0.pt").unlink(), "missing"),
    (lambda p: (p / ckpt.MANIFEST).unlink(), "interrupted"),
    (lambda p: (p / ckpt.MANIFEST).write_text("{not json"), "unreadable"),
])
def test_verify_names_the_damaged_file(tmp_path, damage, reason):
    path = _save(tmp_path, 3)
    damage(path)
    problem = ckpt.verify_checkpoint(path)
    assert problem is not None and reason in problem


def test_find_resume_takes_the_newest_verified_and_lists_the_skipped(tmp_path):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    (newest / "trainer_state.pt").write_bytes(b"")
    found, skipped = ckpt.find_resume(tmp_path)
    assert found == tmp_path / "step_2"
    assert [p.name for p, _ in skipped] == ["step_4"] and "trainer_state.pt" in skipped[0][1]


def test_resave_keeps_a_complete_copy_at_every_instant(tmp_path):
    """The states a kill can leave during a re-save of step 4 each resume from a complete copy of step 4."""
    _save(tmp_path, 2)
    first = _save(tmp_path, 4, seed=0)
    # killed after step_4 was renamed aside, before the new copy moved in:
    os.replace(first, tmp_path / "old_step_4")
    found, skipped = ckpt.find_resume(tmp_path)
    assert found == tmp_path / "old_step_4" and not skipped
    # a later save of step 4 completes the swap and removes the aside copy
    again = _save(tmp_path, 4, seed=3)
    assert ckpt.find_resume(tmp_path) == (again, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_4"]
    # killed after the new copy moved in, before the aside one was deleted: the new one wins
    shutil.copytree(again, tmp_path / "old_step_4")
    assert ckpt.find_resume(tmp_path)[0] == again


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    (tmp_path / "tmp_step_9").mkdir()
    _save(tmp_path, 5, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_5"]


def _disk_full_on(monkeypatch, name: str) -> None:
    """checkpoint.py's torch.save raises ENOSPC for files named ``name``, as on a full disk."""
    real_save = torch.save

    def full(obj, f, *a, **kw):
        if str(f).endswith(name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", full)


def test_full_disk_says_so_removes_the_partial_save_and_names_the_intact_one(tmp_path, monkeypatch):
    _save(tmp_path, 2)
    _disk_full_on(monkeypatch, "trainer_state.pt")
    with pytest.raises(ckpt.CheckpointError) as e:
        _save(tmp_path, 4)
    assert e.value.exit_code == 3  # the run cannot continue safely, as a full metrics.jsonl (cli: exit 3)
    msg = str(e.value)
    assert "no space left on device" in msg and "MiB free" in msg and "step_2 is intact" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]


def test_full_disk_during_the_policy_export_keeps_the_old_export(tmp_path, monkeypatch):
    lm = torch.nn.Linear(4, 3)
    ckpt.save_policy(tmp_path, lm, 8, {"loss": 1.0}, export_hf=False)
    before = (tmp_path / "LATEST" / "policy.pt").read_bytes()
    _disk_full_on(monkeypatch, "policy.pt")
    with pytest.raises(ckpt.SaveError) as e:
        ckpt.save_policy(tmp_path, lm, 16, {"loss": 0.5}, export_hf=False)
    assert e.value.exit_code == 3 and "no space left on device" in str(e.value)
    assert (tmp_path / "LATEST" / "policy.pt").read_bytes() == before
    assert not (tmp_path / "LATEST.tmp").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def _call(module: str, name: str, *args) -> bytes:
    """A protocol-4 pickle of ``module.name(*args)`` (string arguments), written opcode by opcode: STACK_GLOBAL
    passes ``name`` to ``find_class`` as it is, dots included, as a planted ``.metadata`` would."""
    def s(x: str) -> bytes:
        b = x.encode()
        return b"\x8c" + bytes([len(b)]) + b
    return b"\x80\x04" + s(module) + s(name) + b"\x93" + b"(" + b"".join(map(s, args)) + b"tR."


def _payloads(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    py = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    # getattr chain: getattr(torch.Size, "__init__") reached through builtins.getattr
    getattr_chain = (b"\x80\x04" + _call("builtins", "getattr")[2:-4] + b"(" + _call("torch", "Size")[2:-4]
                     + b"\x8c\x08__init__tR.")
    return {
        # the payload: a module DCP's metadata lives in, with os.system reached by attribute traversal
        "dotted_name_in_an_allowed_module": _call("torch.distributed.checkpoint.metadata", "os.system", touch),
        "dotted_name_from_an_allowed_class": _call("torch.distributed.checkpoint.metadata",
                                                   "Metadata.__init__.__globals__", "x"),
        "os_system": _call("os", "system", touch),
        "posix_system": _call("posix", "system", touch),
        "builtins_eval": _call("builtins", "eval", py),
        "builtins_exec": _call("builtins", "exec", py),
        "getattr_chain": getattr_chain,
        "allowed_module_other_function": _call("torch.distributed.checkpoint.filesystem", "_generate_uuid"),
        "torch_serialization_load": _call("torch.serialization", "load", str(marker)),
        "allowed_module_imported_name": _call("torch.distributed.checkpoint.metadata", "field"),
        "torch_function_not_a_dtype": _call("torch", "load", str(marker)),
        "reduce_of_any_object": pickle.dumps({"x": _Evil()}),
    }


@pytest.mark.parametrize("kind", sorted(_payloads(Path("/x"))))
def test_metadata_unpickler_refuses_every_global_but_dcp_metadata_classes(tmp_path, kind):
    path = _save(tmp_path, 1)
    marker = tmp_path / "PWNED"
    (path / ".metadata").write_bytes(_payloads(marker)[kind])
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: not DCP metadata \(.* is not part of checkpoint"):
        ckpt.SafeReader(path).read_metadata()
    model, opt, sched = _model()
    with pytest.raises(ckpt.CheckpointError, match="not DCP metadata"):
        ckpt.load_resume(path, model, opt, sched)
    assert not marker.exists(), "the planted pickle ran"


def test_metadata_unpickler_admits_what_dcp_writes(tmp_path):
    """Real checkpoints load: float32 and bfloat16 parameters, optimizer state, scheduler; every global their
    ``.metadata`` names is admitted (recorded by a plain unpickler), and nothing else is needed."""
    seen: set[tuple[str, str]] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    torch.manual_seed(0)
    for i, dtype in enumerate((torch.float32, torch.bfloat16)):
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8)).to(dtype)
        opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
        model(torch.randn(2, 4, dtype=dtype)).sum().backward()
        opt.step()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        path = ckpt.save_resume(tmp_path / str(i), 1, model, opt, sched, {"examples_seen": 4, "next_eval": 8})
        Recorder(open(path / ".metadata", "rb")).load()
        md = ckpt.SafeReader(path).read_metadata()
        assert md.state_dict_metadata and md.storage_data
        ckpt.load_resume(path, model, opt, sched)
    assert seen and seen <= ckpt._MetadataUnpickler.ALLOWED, seen - ckpt._MetadataUnpickler.ALLOWED
    assert ("torch", "bfloat16") in seen


def test_trainer_state_holding_objects_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    torch.save({"step": 1, "x": _Evil()}, path / "trainer_state.pt")
    model, opt, sched = _model()
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.pt: holds objects") as e:
        ckpt.load_resume(path, model, opt, sched)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and "weights_only" not in str(e.value)
    assert "GLOBAL posix.system" in str(e.value), str(e.value)  # what it met, not torch's advice


def test_archive_checks_catch_truncation_and_changed_bytes_without_a_manifest(tmp_path):
    f = tmp_path / "policy.pt"
    torch.save({"step_idx": 1, "state": {"w": torch.randn(4096)}, "metrics": {}}, f)
    ckpt.verify_archive(f)
    data = bytearray(f.read_bytes())
    i = len(data) // 2  # inside the tensor's 16 KiB
    data[i:i + 64] = b"\0" * 64
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="CRC"):
        ckpt.verify_archive(f)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.verify_archive(f)


def test_non_finite_weights_are_named():
    assert ckpt.non_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")]),
                            "c": torch.tensor([float("inf")]), "n": torch.tensor([1])}) == ["b", "c"]


def test_jsonl_repair_cuts_a_half_line_and_keeps_the_first_records(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert prepare_jsonl(f) == 3 and f.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    assert prepare_jsonl(f, keep=1) == 1 and f.read_text() == '{"step": 1}\n'
    assert prepare_jsonl(tmp_path / "none.jsonl") == 0
