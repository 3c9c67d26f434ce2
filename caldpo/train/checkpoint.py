"""Checkpoints: sharded resume checkpoints (DCP) and the reference-format final export.

Resume checkpoints live in ``<run_dir>/checkpoints/step_<N>``. A save is complete only
when its ``MANIFEST.json`` exists; the manifest (size and sha256 of every other file)
is written last, after every rank's files are on disk, so it is both the completion
marker and the integrity check. The protocol:

1. every rank writes its DCP shards, its ``rng_rank<r>.pt`` (rank 0 also ``trainer_state.pt``)
   into ``tmp_step_<N>``; the ranks hash a share of the files each;
2. rank 0 writes ``MANIFEST.json`` (temp file, fsync, rename), then renames ``tmp_step_<N>``
   to ``step_<N>``. Re-saving a step that exists renames the old copy to ``old_step_<N>``
   first, moves the new one in, then deletes the old one: at every instant a complete
   copy of the step exists, and resume recognises ``old_step_<N>`` as a fallback;
3. older complete checkpoints beyond ``keep`` are removed only after the new one is in place.

Resume (``find_resume``) takes the newest checkpoint whose manifest verifies, and names
every newer one it skipped with the file and the reason. ``trainer_state.pt`` and the RNG
files hold tensors and plain Python types only and load with ``weights_only=True``; DCP's
``.metadata`` is a pickle, read here with an unpickler that admits only DCP's own metadata
classes, and only after its checksum matched the manifest.

The final export is ``<run_dir>/LATEST/policy.pt`` holding ``{"step_idx", "state", "metrics"}``
(the reference code's format), ``LATEST/hf`` (Hugging Face ``save_pretrained``) and
``LATEST/MANIFEST.json``; it is built in ``LATEST.tmp`` and swapped in the same way.
Non-finite weights are never written (``NonFiniteError``).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from caldpo.files import swap_dir, write_atomic

from .config import ConfigError
from .faults import fault_point
from .rundir import RunError

log = logging.getLogger("caldpo")

STEP_DIR = re.compile(r"^(old_)?step_(\d+)$")
MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message names the file, the reason and what to do."""


class SaveError(CheckpointError):
    """A resume checkpoint or the policy export could not be written (a full disk, an unwritable directory):
    the run cannot continue safely (``python -m caldpo.train`` exits 3); what was saved before is intact."""

    exit_code = 3


class NonFiniteError(CheckpointError):
    """Weights holding NaN or Inf were about to be written (``python -m caldpo.train`` exits 3)."""

    exit_code = 3


# ----------------------------------------------------------------------------- collectives

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    """``obj`` of every rank, in rank order (a list of one in a single process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- hashing and manifests

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    """Every file under ``root`` except the manifest, as sorted POSIX paths relative to ``root``."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_share(root: Path, names: list[str]) -> dict[str, dict]:
    """Size and sha256 of this rank's share of ``names`` (every world-th file): the ranks hash in parallel."""
    mine = names[_rank()::_world()]
    return {n: {"size": (root / n).stat().st_size, "sha256": sha256_file(root / n)} for n in mine}


def write_manifest(root: Path, files: dict[str, dict], **extra) -> None:
    """Write ``root/MANIFEST.json`` atomically (``caldpo.files.write_atomic``: temp file, fsync, rename,
    fsync of the directory)."""
    write_atomic(root / MANIFEST, json.dumps({"format": 1, **extra, "files": files}, indent=1, sort_keys=True))


def read_manifest(root: Path) -> dict:
    """The manifest of ``root``; raises CheckpointError naming the problem."""
    path = root / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{MANIFEST}: missing (the save was interrupted before it completed)")
    try:
        man = json.loads(path.read_text())
        files = man["files"]
        assert isinstance(files, dict) and all({"size", "sha256"} <= set(v) for v in files.values())
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        raise CheckpointError(f"{MANIFEST}: unreadable (not the JSON manifest caldpo writes)") from None
    return man


def verify_files(root: Path, names: list[str], files: dict[str, dict]) -> list[str]:
    """Problems ("file: reason") of the named files against the manifest entries."""
    problems = []
    for name in names:
        want, path = files[name], root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != want["size"]:
            size = path.stat().st_size
            problems.append(f"{name}: {size} bytes, the manifest says {want['size']} "
                            f"({'truncated?' if size < want['size'] else 'written over or appended to?'})")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (bytes changed on disk)")
    return problems


def verify_checkpoint(path: Path) -> str | None:
    """None if ``path`` is a complete checkpoint whose files match its manifest, else the first problem.

    Collective under torch.distributed: every rank hashes a share of the files and all ranks
    return the same answer.
    """
    try:
        man = read_manifest(path)
        names = sorted(man["files"])
        for required in (".metadata", "trainer_state.pt"):
            if required not in man["files"]:
                raise CheckpointError(f"{MANIFEST}: does not list {required}")
        problems = verify_files(path, names[_rank()::_world()], man["files"])
    except CheckpointError as e:
        problems = [str(e)]
    except OSError as e:
        problems = [f"unreadable: {e}"]
    problems = sorted({p for share in _gather(problems) for p in share})
    return "; ".join(problems) if problems else None


# ----------------------------------------------------------------------------- RNG and trainer state

def rng_state() -> dict:
    """Every generator's state as tensors and plain types (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _safe_load(path: Path):
    """``torch.load(weights_only=True)``; a file holding anything else raises CheckpointError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text opens with advice to load with weights_only=False (terminal escapes included): name the
        # object it met instead ("Trying to load unsupported GLOBAL posix.system ...") and nothing else
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in str(e).splitlines()]
        what = next((x for x in lines if "GLOBAL" in x or "nsupported" in x), "")
        raise CheckpointError(f"{path}: holds objects other than tensors and plain types; refusing to "
                              f"unpickle it{f' ({what})' if what else ''}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


_DCP = "torch.distributed.checkpoint.metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """Admits exactly the globals DCP's ``.metadata`` is made of, as (module, name) pairs; nothing else.

    What ``dcp.save`` pickles (read off real checkpoints of torch 2.13 and checked against torch
    2.11's ``torch/distributed/checkpoint/metadata.py`` and ``filesystem.py``, which define the same
    classes): the dataclasses of ``metadata.py`` and ``filesystem._StorageInfo``; ``torch.Size``;
    dtypes, pickled as ``torch.<name>``; layouts, pickled as a call of ``torch.serialization._get_layout``
    (a lookup of the layout by its name); a ``PosixPath`` (the checkpoint id). Names are matched
    whole: a dotted name (pickle protocol 4 resolves ``"os.system"`` in a module that imported
    ``os``) is refused, and so is every other global of the same modules (their functions, the
    modules they import).
    """

    ALLOWED = frozenset({
        (_DCP, "Metadata"), (_DCP, "StorageMeta"), (_DCP, "MetadataIndex"), (_DCP, "TensorStorageMetadata"),
        (_DCP, "BytesStorageMetadata"), (_DCP, "ChunkStorageMetadata"), (_DCP, "TensorProperties"),
        (_DCP, "_MEM_FORMAT_ENCODING"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
        ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"),  # Python 3.13's module name
    }) | {("torch", n) for n, v in vars(torch).items() if isinstance(v, torch.dtype)}

    def find_class(self, module, name):
        if "." not in name and (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader, reading ``.metadata`` with the restricted unpickler."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{path}: not DCP metadata ({e})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ----------------------------------------------------------------------------- resume checkpoints

def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every ``step_N`` and ``old_step_N`` under ``root``, newest first, ``step_N`` before
    ``old_step_N`` of the same step (the aside copy of an interrupted re-save)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(2)), m.group(1) is not None, p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [(step, p) for step, _, p in sorted(found, key=lambda t: (-t[0], t[1]))]


def find_resume(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest verified checkpoint under ``root`` (or None) and the newer ones skipped, with the reason.

    Collective under torch.distributed.
    """
    skipped = []
    for _, path in checkpoint_dirs(root):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def latest_resume(root: Path) -> Path | None:
    """The newest complete checkpoint (manifest present, not verified) under ``root``, or None."""
    return next((p for _, p in checkpoint_dirs(root) if (p / MANIFEST).is_file()), None)


def _checkpoint_bytes(path: Path | None) -> int:
    try:
        return sum(v["size"] for v in read_manifest(path)["files"].values()) if path else 0
    except (CheckpointError, OSError):
        return 0


def _error_chain(e: BaseException) -> list[BaseException]:
    out, todo = [], [e]
    while todo:
        x = todo.pop()
        if x is None or any(x is y for y in out):
            continue
        out.append(x)
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)  # CheckpointException: {rank: exception}
        if isinstance(failures, dict):
            todo += [v for v in failures.values() if isinstance(v, BaseException)]
    return out


def _is_disk_full(e: BaseException, where: Path, need: int) -> bool:
    if any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in _error_chain(e)):
        return True
    text = " ".join(str(x) for x in _error_chain(e))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = 0
    return "No space left" in text or ("unexpected pos" in text) or free < max(need, 1 << 20)


def save_failed_message(what: str, where: Path, e: BaseException, need: int, intact: str) -> str:
    """One paragraph for a failed save: disk full (with the free space) or the error itself, and what is intact."""
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = -1
    if _is_disk_full(e, where, need):
        cause = (f"no space left on device ({free / 2**20:.0f} MiB free on {where}"
                 + (f", about {need / 2**20:.0f} MiB needed" if need else "") + ")")
    else:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        cause = f"{type(e).__name__}: {last}"
    return (f"saving {what} failed: {cause}. The partial files were removed; {intact}. "
            "Free space (or fix the cause) and rerun the same command to resume.")


def save_resume(root: Path, step: int, model, optimizer, scheduler, trainer_state: dict, keep: int = 2) -> Path:
    """Save model, optimizer, scheduler, data position and RNG of every rank (protocol in the module doc).

    Raises CheckpointError (every rank) when any rank fails to write; the partial directory is removed
    and the message says whether the disk is full and which checkpoint is intact.
    """
    rank = _rank()
    final, tmp, aside = root / f"step_{step}", root / f"tmp_step_{step}", root / f"old_step_{step}"
    previous = latest_resume(root)
    error = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():  # DCP warns when it runs without a process group, which is intended here
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        fault_point("save_dcp_written", step)
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            state = dict(trainer_state, step=step, scheduler=scheduler.state_dict())
            torch.save(state, tmp / "trainer_state.pt")
    except (OSError, RuntimeError, ValueError) as e:  # CheckpointException is a BaseException subclass too
        error = e
    except BaseException as e:
        if type(e).__name__ != "CheckpointException":
            raise
        error = e
    intact = f"{previous} is intact" if previous else "no earlier checkpoint exists"
    need = max(_checkpoint_bytes(previous), 1 << 20)
    what = f"checkpoint step_{step} to {root}"

    def agree(e: BaseException | None) -> str | None:
        msgs = _gather(None if e is None else save_failed_message(what, root, e, need, intact))
        return next((m for m in msgs if m), None)

    failed = agree(error)
    if failed is None:
        try:
            _barrier()
            names = _files(tmp)
            for n in names[rank::_world()]:
                _fsync(tmp / n)
            shares = _gather(_hash_share(tmp, names))
            fault_point("save_before_marker", step)
            if rank == 0:
                files = {k: v for share in shares for k, v in share.items()}
                write_manifest(tmp, files, step=step, world_size=_world())
        except OSError as e:
            error = e
        failed = agree(error)
    if failed is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(failed)
    fault_point("save_before_rename", step)
    if rank == 0:
        if final.exists():
            if (final / MANIFEST).is_file():
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
                _fsync(root)
                fault_point("resave_aside", step)
            else:  # an incomplete step_N (not written by this protocol): never a usable copy
                shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        fault_point("resave_before_delete", step)
        shutil.rmtree(aside, ignore_errors=True)
        _rotate(root, final, keep)
    _barrier()
    return final


def _rotate(root: Path, newest: Path, keep: int) -> None:
    """Remove complete checkpoints beyond the newest ``keep``, every aside copy and stale temp directory."""
    complete = [p for _, p in checkpoint_dirs(root) if p.name.startswith("step_") and (p / MANIFEST).is_file()]
    for old in complete[max(keep, 1):]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)
    for p in root.iterdir():
        if p != newest and (p.name.startswith(("tmp_step_", "old_step_"))
                            or (STEP_DIR.match(p.name) and not (p / MANIFEST).is_file())):
            shutil.rmtree(p, ignore_errors=True)


def load_resume(path: Path, model, optimizer, scheduler) -> dict:
    """Restore what save_resume wrote; returns the trainer state (step, examples seen, ...).

    Call only on a checkpoint that ``verify_checkpoint`` passed. Raises CheckpointError for a file
    that is not what caldpo writes, and the errors of DCP / ``set_state_dict`` (RuntimeError,
    KeyError, ValueError, CheckpointException) when the checkpoint does not fit the model or optimizer.
    """
    SafeReader(path).read_metadata()  # a .metadata that is not DCP's own raises CheckpointError here, by name
    trainer_state = _safe_load(path / "trainer_state.pt")
    rng_file = path / f"rng_rank{_rank()}.pt"
    rng = _safe_load(rng_file) if rng_file.exists() else None
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, storage_reader=SafeReader(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(trainer_state.pop("scheduler"))
    if rng is not None:
        set_rng_state(rng)
    return trainer_state


def resume_newest(root: Path, run_dir: Path, model, optimizer, scheduler, *,
                  announce: bool) -> tuple[dict | None, list | int | None]:
    """Resume from the newest checkpoint under ``root`` whose manifest verifies (``find_resume``).

    Returns (the trainer state, with ``step`` and ``checkpoint`` (its path); or None to start fresh, the metrics records to keep:
    None = all, 0 = none). Newer damaged checkpoints are named and moved aside
    (``damaged_step_N``, rank 0). A run directory whose checkpoints are all damaged is refused
    (RunError); one that holds metrics but never completed a checkpoint starts from step 0, says so,
    and drops those records. A checkpoint that does not fit the model or optimizer is a ConfigError.
    Collective under torch.distributed; ``announce``: this rank logs.
    """
    path, skipped = find_resume(root)
    for bad, why in skipped:
        if announce:
            log.warning("checkpoint %s is damaged (%s); %s", bad, why,
                        f"resuming from {path.name}" if path else "no older checkpoint verifies")
    if path is None:
        if skipped:
            raise RunError(
                f"cannot resume {run_dir}: no usable checkpoint ("
                + "; ".join(f"{p.name}: {why}" for p, why in skipped)
                + "). Nothing was changed. To recover: restore checkpoints/ from a copy, or start over "
                "with a new run_dir (or move checkpoints/ and metrics.jsonl out of this one).")
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and metrics.stat().st_size > 0:
            if announce:
                log.warning("%s holds metrics, but no checkpoint was completed before the run stopped: "
                            "training starts again from step 0 and those records are dropped", metrics)
            return None, 0
        return None, None
    if _rank() == 0:
        for bad, _ in skipped:
            aside = bad.with_name("damaged_" + bad.name)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(bad, aside)
    try:
        state = load_resume(path, model, optimizer, scheduler)
    except CheckpointError as e:
        raise RunError(f"cannot resume from {path}: {e}. Its checksums match its manifest, so the "
                       "files were written this way: remove that checkpoint to resume from an older "
                       "one, or use a new run_dir.") from None
    except (RuntimeError, KeyError, ValueError, dcp.api.CheckpointException) as e:
        raise ConfigError(f"cannot resume from {path}: it does not match this configuration (a different "
                          f"model or optimizer?): {str(e).strip().splitlines()[-1]} "
                          "Use the original command, or a new run_dir.") from None
    state["checkpoint"] = str(path)  # the caller says "resumed from" once it accepts the state (its data checks)
    return state, state.get("metrics_records")


# ----------------------------------------------------------------------------- final export

def full_state_dict(module) -> dict[str, torch.Tensor]:
    """Unsharded, CPU state dict gathered on every rank (only rank 0 keeps values under FSDP2)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=opts)


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding NaN or Inf."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def save_policy(run_dir: Path, lm, step: int, metrics: dict, tokenizer=None, export_hf: bool = True,
                dest: str = "LATEST") -> Path | None:
    """Write ``<dest>/policy.pt`` (and the HF export, and ``MANIFEST.json``) from rank 0; every rank must call it.

    ``step`` is stored as ``step_idx``: the trainer passes the examples seen, as the reference code does.

    Built in ``<dest>.tmp`` and swapped in whole. Raises NonFiniteError (every rank) when a weight is not
    finite, SaveError (exit 3) when the write fails (disk full names the free space).
    """
    state = full_state_dict(lm)
    bad = non_finite(state) if _rank() == 0 else []
    bad = next((b for b in _gather(bad) if b), [])
    if bad:
        raise NonFiniteError(f"not exporting {run_dir / dest}/policy.pt: {len(bad)} weight tensors hold NaN/Inf "
                             f"(e.g. {bad[:3]})")
    error = None
    out = run_dir / dest
    if _rank() == 0:
        tmp = run_dir / (dest + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save({"step_idx": step, "state": state, "metrics": metrics}, tmp / "policy.pt")
            fault_point("policy_tmp" if dest == "LATEST" else "eval_policy_tmp")
            if export_hf:
                hf_dir = tmp / "hf"
                lm.save_pretrained(hf_dir, state_dict=state, safe_serialization=True)
                fault_point("hf_export")
                if tokenizer is not None:
                    tokenizer.save_pretrained(hf_dir)
            with open(tmp / "metrics.json", "w") as f:
                json.dump(metrics, f, indent=2, default=float)
            names = _files(tmp)
            for n in names:
                _fsync(tmp / n)
            write_manifest(tmp, {n: {"size": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)}
                                 for n in names}, step_idx=step)
            swap_dir(tmp, out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            need = sum(v.numel() * v.element_size() for v in state.values()) * (2 if export_hf else 1)
            error = save_failed_message(f"the policy export {out}", run_dir, e, need,
                                        "the resume checkpoints are intact")
    error = next((e for e in _gather(error) if e), None)
    if error:
        raise SaveError(error)
    return out / "policy.pt" if _rank() == 0 else None


def verify_archive(path: Path) -> None:
    """Check a ``policy.pt`` before loading it: its ``MANIFEST.json`` entry when one lies beside it, and the
    CRC-32 of every record of its zip container (torch.save's format), which catches truncation and
    changed bytes even in a file copied without its manifest. Raises CheckpointError naming the reason."""
    import zipfile
    man_path = path.parent / MANIFEST
    if man_path.is_file():
        try:
            man = read_manifest(path.parent)
        except CheckpointError as e:
            raise CheckpointError(f"{man_path}: {e}") from None
        if path.name in man["files"]:
            problems = verify_files(path.parent, [path.name], man["files"])
            if problems:
                raise CheckpointError(problems[0])
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except zipfile.BadZipFile:
        raise CheckpointError("not a torch.save checkpoint (no zip directory: truncated, or another format)") from None
    except (OSError, EOFError) as e:
        raise CheckpointError(f"unreadable ({e})") from None
    if bad is not None:
        raise CheckpointError(f"record {bad} fails its CRC check (bytes changed on disk)")


def archive_digest(path: Path) -> str:
    """sha256 of a ``policy.pt``: from the ``MANIFEST.json`` beside it when it lists the file (load_archive_state
    has verified it), else computed."""
    try:
        entry = read_manifest(path.parent)["files"].get(path.name)
    except (CheckpointError, OSError):
        entry = None
    return entry["sha256"] if entry else sha256_file(path)
