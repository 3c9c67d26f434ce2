"""What crosses between the host and the device in a training step, and the count of host syncs.

A host sync (the CPU waiting for the GPU's queue to drain) stalls the launch pipeline, so the
step keeps them to two: the one read-back of the step's flags and metrics
(``distributed.MetricSums.means``) and the step timer's ``synchronize`` (``metrics.Throughput``).
Both go through ``read`` / ``synchronize`` here, which count every call in ``SYNCS`` on every
device (on the CPU they are where the syncs would be), so a test counts them without a GPU; on
CUDA ``torch.cuda.set_sync_debug_mode`` sees the rest (tests/test_host_syncs.py::test_cuda_step_syncs).

Host to device: ``to_device`` copies from pinned memory without blocking (a copy from pageable
memory synchronizes the stream).
"""
from __future__ import annotations

import torch


class SyncCounter:
    """How many host syncs the project's own sync points have made (``count``, monotone)."""

    def __init__(self):
        self.count = 0

    def add(self, n: int = 1) -> None:
        self.count += n


SYNCS = SyncCounter()


def read(t: torch.Tensor) -> list:
    """``t.tolist()``: the values on the host (one counted sync when ``t`` is on an accelerator)."""
    SYNCS.add()
    return t.tolist()


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queue (a counted sync; nothing to wait for on the CPU)."""
    SYNCS.add()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: from the host through pinned memory with ``non_blocking=True`` (the host
    tensor must not change afterwards, which holds for the collator's fresh tensors); unchanged when
    already there."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
