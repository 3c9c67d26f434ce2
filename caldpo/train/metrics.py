"""Metrics: JSON lines (always), TensorBoard / Weights & Biases (optional), throughput and MFU."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError

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


class MetricsWriter:
    """Writes one JSON object per record to ``<run_dir>/metrics.jsonl``; mirrors to TB / W&B if asked."""

    def __init__(self, run_dir: Path, cfg: DictConfig, enabled: bool):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = self.wandb = None
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

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record, default=float) + "\n")
        self.file.flush()
        split = record.get("split", "train")
        scalars = {f"{split}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record.get("step", 0))
        if self.wandb is not None:
            self.wandb.log(scalars, step=record.get("step", 0))

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
