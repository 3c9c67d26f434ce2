"""Metrics: JSON lines (always), TensorBoard / Weights & Biases (optional), throughput and MFU."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from caldpo.files import free_space, os_reason, prepare_jsonl

from .config import ConfigError

log = logging.getLogger("caldpo")

# Dense bf16 peak FLOP/s by device name substring (vendor datasheets, no sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12,
              "4090": 165e12, "V100": 125e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    except ImportError:
        return None


class Throughput:
    """Tokens/s, step time and MFU per optimizer step.

    FLOPs per token: 6 x matmul params for the policy (forward + backward), plus 2 x for the
    reference forward when it runs each step, plus attention (12 x layers x hidden x seq) scaled
    the same way; the sequence length used is the mean tokens per sequence.
    """

    def __init__(self, n_params: int, n_layers: int, hidden: int, device: torch.device, *, with_reference: bool,
                 world: int):
        self.n_params, self.n_layers, self.hidden = n_params, n_layers, hidden
        self.device, self.world = device, world
        self.mult = 6 + (2 if with_reference else 0)
        self.peak = device_peak_flops(device)
        self.t0 = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()

    def stop(self, tokens: float, seq_len: float | None = None) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self.t0
        seq = seq_len or 0.0
        flops_per_token = self.mult * (self.n_params + 2 * self.n_layers * self.hidden * seq)
        out = {"step_time": dt, "tokens_per_second": tokens / dt, "tokens_per_second_per_device": tokens / dt / self.world}
        if self.peak:
            out["mfu"] = flops_per_token * tokens / dt / (self.peak * self.world)
        mem = peak_memory_gb(self.device)
        if mem is not None:
            out["peak_memory_gb"] = mem
        return out


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file, skipping lines that do not parse."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


# TensorBoard / W&B names: those of the authors' trainer (Cal-DPO's, from Mitchell et al.'s DPO
# trainers.py: f"rewards_{train_test}/chosen", f"loss/{train_test}", ...), so dashboards built on
# their runs keep working. metrics.jsonl keeps caldpo's own names (the keys here). "{s}" is the
# record's split: "train" or "eval".
AUTHORS_NAMES = {
    "rewards/chosen": "rewards_{s}/chosen", "rewards/rejected": "rewards_{s}/rejected",
    "rewards/accuracies": "rewards_{s}/accuracies", "rewards/margins": "rewards_{s}/margins",
    "logps/chosen": "logps_{s}/chosen", "logps/rejected": "logps_{s}/rejected",
    "loss": "loss/{s}",
    "loss/preference": "dpo_loss/{s}",  # Cal-DPO's -log sigmoid(h_w - h_l) term
    "loss/calibration": "reg_loss/{s}",  # Cal-DPO's calibration (squared-error) term
    "grad_norm": "grad_norm", "examples": "counters/examples", "step": "counters/updates",
}
TRAIN_ONLY = ("grad_norm", "examples", "step")  # the authors log these with the training metrics only


def dashboard_scalars(record: dict, batch_size: int) -> tuple[dict[str, float], int]:
    """One metrics.jsonl record -> (scalars under the authors' names, x-axis step).

    The step is the number of training examples seen (the authors' ``example_counter``, their
    W&B step). Keys with no authors' name keep ``"<split>/<key>"`` (``train/lr``,
    ``train/tokens_per_second``, ``eval/eval_seconds``). A training record with ``step_time``
    (seconds) also gives the authors' ``examples_per_second`` = batch_size / step_time. Records of
    other splits (a resumed run's ``"resume"`` marker) give no scalars.
    """
    split = record.get("split", "train")
    out: dict[str, float] = {}
    if split not in ("train", "eval"):  # the "resume" marker of a resumed run: no metric to draw
        return out, int(record.get("examples", record.get("step", 0)))
    for k, v in record.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or k in TRAIN_ONLY and split != "train":
            continue
        name = AUTHORS_NAMES.get(k)
        out[name.format(s=split) if name else f"{split}/{k}"] = float(v)
    if split == "train" and record.get("step_time"):
        out["examples_per_second"] = batch_size / float(record["step_time"])
    return out, int(record.get("examples", record.get("step", 0)))


class MetricsWriter:
    """Writes one JSON object per record to ``<run_dir>/metrics.jsonl``; mirrors to TB / W&B if asked."""

    def __init__(self, run_dir: Path, cfg: DictConfig, enabled: bool, keep_records: int | None = None):
        """``keep_records``: on resume, the number of lines the file held when the resumed checkpoint was
        saved; later lines (records of steps that will run again) are dropped. 0 starts the file afresh."""
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.file = None
        try:
            self.records = prepare_jsonl(self.path, keep_records) if enabled else 0
            self.file = open(self.path, "a") if enabled else None  # noqa: SIM115 (closed in close())
        except OSError as e:
            raise self._failed(e) from e
        self.tb = self.wandb = None
        self.batch_size = cfg.batch_size  # examples per optimizer step (examples_per_second)
        if not enabled:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError(f"tensorboard=true but TensorBoard is not installed: {e}") from None
            self.tb = SummaryWriter(str(run_dir / "tb"))
        if cfg.wandb.enabled:
            try:
                import wandb
            except ImportError:
                raise ConfigError("wandb.enabled=true but wandb is not installed: pip install wandb") from None
            self.wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.exp_name,
                                    dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True))

    def _failed(self, e: OSError):
        """RunError (exit status 3) for a failed write of metrics.jsonl: the file, the errno text, the free
        space of its filesystem and what is kept. The file is closed; later writes do nothing."""
        from .checkpoint import latest_resume
        from .rundir import RunError

        if self.file is not None:
            try:
                self.file.close()  # flushes what is buffered, if it can
            except OSError:
                pass
        self.file, self.enabled = None, False
        free = free_space(self.path.parent)
        resume = latest_resume(self.path.parent / "checkpoints")
        kept = (f"the last resume checkpoint {resume} is kept and a rerun resumes from it (the records after it "
                "are written again)" if resume is not None else "no resume checkpoint was saved yet: a rerun starts over")
        return RunError(f"writing {self.path} failed: {os_reason(e)} ({free}); {kept}. "
                        "Free space (or make the file writable) and rerun the same command.", exit_code=3)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(record, default=float) + "\n")
            self.file.flush()
        except OSError as e:
            raise self._failed(e) from e
        self.records += 1
        if self.tb is None and self.wandb is None:
            return
        scalars, step = dashboard_scalars(record, self.batch_size)
        if not scalars:
            return
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
