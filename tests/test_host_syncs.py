"""Host syncs of a training step: at most two (the metric read-back and the step timer).

On CPU the project's own sync points count themselves (``caldpo.train.host.SYNCS``, logged per step
as ``host_syncs``); the head's compaction is checked to run no ``nonzero`` when the collator passes
its scored positions. On CUDA ``torch.cuda.set_sync_debug_mode`` catches any sync, ours or not
(skipped without a GPU).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import TINY, read_metrics, run_train

from caldpo.kernels import linear_logprobs, sequence_logprobs
from caldpo.kernels import logprobs as lp


@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
def test_a_step_makes_two_host_syncs(tmp_path, layout):
    """Cal-DPO with the live reference, 2 micro-batches per step: 2 counted syncs per step (the code before
    made 7 per micro-batch plus 7 per step on CUDA: blocking copies, the head's nonzero, HF's mask checks)."""
    run_train([*TINY, "loss=caldpo", "loss.beta=0.1", "n_examples=16", "batch_size=8", "gradient_accumulation_steps=2",
               "do_first_eval=false", "eval_every=100000", "debug=true", "export_hf=false", f"layout={layout}",
               f"run_dir={tmp_path}"])
    records = read_metrics(tmp_path)
    assert len(records) == 2
    assert [r["host_syncs"] for r in records] == [2, 2]


def _no_nonzero(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("nonzero called: a host sync on CUDA")
    monkeypatch.setattr(lp, "_kept", refuse)
    monkeypatch.setattr(torch.Tensor, "nonzero", refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_head_with_known_positions_runs_no_nonzero(monkeypatch, backend):
    from caldpo.kernels.backends import available_backends
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} backend not available here")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (3, 7), generator=g)
    labels[:, :3] = -100
    labels[1, 5:] = -100
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    kept = (shifted.reshape(-1) != -100).nonzero().squeeze(1)
    expected = sequence_logprobs(hidden, weight, labels, backend=backend)
    ge = torch.autograd.grad(expected.sum(), (hidden, weight))
    with monkeypatch.context() as m:
        _no_nonzero(m)
        got = sequence_logprobs(hidden, weight, labels, backend=backend, kept=kept)
        gg = torch.autograd.grad(got.sum(), (hidden, weight))
        flat = hidden.reshape(-1, 16)[kept]
        every = linear_logprobs(flat, weight, shifted.reshape(-1)[kept], backend=backend,
                                kept=torch.arange(kept.numel()))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for a, b in zip(gg, ge):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(every, linear_logprobs(flat, weight, shifted.reshape(-1)[kept], backend=backend))


def test_known_positions_still_check_targets_on_cpu():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="outside the head's vocabulary"):
        linear_logprobs(hidden, weight, torch.tensor([1, 2, 10, 3]), backend="torch", kept=torch.arange(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA syncs with torch.cuda.set_sync_debug_mode")
@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
def test_cuda_step_syncs(tmp_path, layout):
    """A warmed-up step on CUDA (bf16 policy under FSDP2 mixed precision, the live reference) makes at most
    2 host syncs by torch's own count (metric read-back; the step timer's synchronize)."""
    from caldpo.train.config import load_config
    from caldpo.train.trainer import Trainer
    cfg = load_config([*[a for a in TINY if not a.startswith("device=")], "device=cuda", "loss=caldpo",
                       "loss.beta=0.1", "n_examples=24", "batch_size=8", "gradient_accumulation_steps=2",
                       "trainer=FSDPTrainer", "model.fsdp_policy_mp=bfloat16", "model.reference_dtype=bfloat16",
                       "do_first_eval=false", "debug=true", "export_hf=false", f"layout={layout}",
                       f"run_dir={tmp_path}"])
    trainer = Trainer(cfg)
    try:
        trainer.train_step(trainer.schedule.indices(0, 8))  # warm-up: autotuning, cuBLAS handles, allocations
        torch.cuda.synchronize()
        for step in (1, 2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    trainer.throughput.start()
                    out = trainer.train_step(trainer.schedule.indices(8 * step, 8))
                    trainer.throughput.stop(out["tokens"], out["useful_tokens"], out["attention_context"],
                                            out["scored_tokens"])
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
            assert len(syncs) <= 2, syncs
    finally:
        trainer.process.close()
