"""The process a trainer runs in: rank, world, device, the process group, the FSDP2 mesh, and what crosses ranks.

One process (``BasicTrainer``) or one of ``WORLD_SIZE`` processes under torchrun / Slurm
(``FSDPTrainer``): ``Process.setup`` reads torchrun's environment, picks the device and
initialises torch.distributed. Everything that crosses ranks goes through a ``Process``:
sums, the any-rank flag (stop requests, non-finite steps), rank 0's verdict (the run
lock), the rank's share of an evaluation chunk, and the means of per-example metrics with the
step's token counts (``MetricSums``, one collective and one host sync per step).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError
from .host import read, to_device


@dataclass
class Process:
    """This process's place in the job.

    rank, world, local_rank: torchrun's RANK, WORLD_SIZE, LOCAL_RANK (0, 1, 0 outside torchrun).
    device: ``cuda:<local_rank>`` or ``cpu``. fsdp: the policy and reference are sharded with FSDP2
    on ``mesh`` (a 1D DeviceMesh over all ranks), even in one process.
    """

    rank: int
    world: int
    local_rank: int
    device: torch.device
    fsdp: bool
    mesh: object | None = None

    @classmethod
    def setup(cls, device_pref: str, fsdp: bool) -> "Process":
        """Initialise the process group (nccl on CUDA, gloo on CPU) when needed.

        device_pref: ``auto`` (CUDA when available), ``cuda`` or ``cpu``.
        Raises ConfigError for device=cuda without a CUDA device.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_pref == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is available")
        use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
        device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        backend = "nccl" if use_cuda else "gloo"
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30),
                                    device_id=device if use_cuda else None)
        if fsdp and not dist.is_initialized():  # FSDP2 needs a process group even for one process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    os.environ["MASTER_PORT"] = str(s.getsockname()[1])
            dist.init_process_group(backend, rank=0, world_size=1)
        mesh = None
        if fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh(device.type, (world,))
        return cls(rank, world, local, device, fsdp, mesh)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_initialized() and dist.get_world_size() > 1

    def place(self, model: torch.nn.Module, cfg, trainable: bool) -> None:
        """Shard ``model`` with FSDP2 on the mesh (``model.shard``: the policy under
        ``model.fsdp_policy_mp``, a frozen reference without mixed precision), or move it to the device."""
        if self.fsdp:
            from .model import shard
            shard(model, cfg, self.mesh, trainable=trainable)
        else:
            model.to(self.device)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks, in place; returns it."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, *flags) -> bool | list[bool]:
        """Whether each flag (a bool or a 0-d tensor) is true on any rank: one collective for all of them.
        One flag gives a bool, several a list."""
        t = torch.stack([to_device(torch.as_tensor(f), self.device).reshape(()).float() for f in flags])
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out = [v > 0 for v in read(t)]
        return out[0] if len(flags) == 1 else out

    def from_main(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, chunk: list[int], chunk_size: int) -> tuple[list[int], float]:
        """This rank's contiguous share of an evaluation chunk of up to ``chunk_size`` indices, and its weight.

        A rank left with nothing (the last chunk) runs a dummy forward on the chunk's first
        example with weight 0: under FSDP2 every rank must run the same number of forwards.
        """
        per_rank = chunk_size // self.world
        mine = chunk[self.rank * per_rank:(self.rank + 1) * per_rank]
        return (mine, 1.0) if mine else (chunk[:1], 0.0)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class MetricSums:
    """Per-example metrics summed over micro-batches and ranks, read as means.

    ``add`` keeps each metric's sum on its device (no host sync) and its example count on the
    host; ``means`` reduces all of them over ranks in one collective and reads them back with
    one host sync (``host.read``), together with the step's flags and rank 0's values.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}
        self.totals: dict[str, float] = {}

    def add_totals(self, **values: float) -> None:
        """Host numbers summed over calls and ranks (token counts), read back as sums by ``means``."""
        for k, v in values.items():
            self.totals[k] = self.totals.get(k, 0.0) + float(v)

    def add(self, metrics: dict[str, torch.Tensor], weight: float = 1.0) -> None:
        """metrics: name -> per-example values (any shape; every element counts once), times ``weight``."""
        for k, v in metrics.items():
            s = v.detach().float().sum() * weight
            self.sums[k] = self.sums[k] + s if k in self.sums else s
            self.counts[k] = self.counts.get(k, 0.0) + v.numel() * weight

    def means(self, process: Process, *, flags: dict | None = None, main: dict | None = None) -> dict:
        """name -> (sum over ranks) / (count over ranks) (a count of 0 gives the sum, 0), and each of
        ``add_totals``' names -> its sum over ranks; plus each of ``flags`` (name -> a bool or a 0-d
        device tensor) -> whether it is true on any rank, and each of ``main`` (name -> a 0-d tensor
        or number every rank holds alike, e.g. the global grad norm) -> rank 0's value.
        One collective (float64) and one host sync for all of it.
        """
        flags, main = flags or {}, main or {}
        keys, names = sorted(self.sums), sorted(self.totals)
        if not keys and not names and not flags and not main:
            return {}
        dev, is_main = process.device, process.rank == 0
        # device values first (no host round trip), then one pinned copy of the host numbers
        dev_vals = [(k, self.sums[k].detach().double(), "mean") for k in keys]
        host_vals: list[tuple[str, float, str]] = []
        for k, v in flags.items():
            (dev_vals if torch.is_tensor(v) else host_vals).append(
                (k, v.detach().reshape(()).double() if torch.is_tensor(v) else float(bool(v)), "flag"))
        for k, v in main.items():
            if torch.is_tensor(v):
                dev_vals.append((k, v.detach().reshape(()).double() * float(is_main), "main"))
            else:
                host_vals.append((k, float(v) if is_main else 0.0, "main"))
        host_vals += [(f"count:{k}", self.counts[k], "count") for k in keys]
        host_vals += [(k, self.totals[k], "total") for k in names]
        parts = [torch.stack([v.to(dev) for _, v, _ in dev_vals])] if dev_vals else []
        parts.append(to_device(torch.tensor([v for _, v, _ in host_vals], dtype=torch.float64), dev))
        values = read(process.all_reduce(torch.cat(parts)))
        got = {(k, kind): x for (k, _, kind), x in zip(dev_vals + host_vals, values)}
        out: dict = {}
        for (k, kind), x in got.items():
            if kind == "mean":
                out[k] = x / max(got[(f"count:{k}", "count")], 1.0)
            elif kind == "flag":
                out[k] = x > 0
            elif kind in ("main", "total"):
                out[k] = x
        return out
