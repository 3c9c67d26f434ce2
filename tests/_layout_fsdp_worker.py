"""torchrun worker for tests/test_layout.py: FSDP2 (gloo, CPU) log-probs and gradients per layout.

Every rank runs the same micro-batch through one sharded model under each layout and checks
that packed and prefix-shared log-probs and full (all-gathered) gradients, on dense masks and as
attention segments (caldpo.train.attention, its CPU emulation), equal the padded layout's with its
mask (fp32, relative error <= 1e-5). Writes <out>/ok<rank> on success.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from caldpo.train.attention import register
from caldpo.train.batches import collate
from caldpo.train.layout import pack
from caldpo.train.losses import concatenated
from caldpo.train.model import LogProbModel, transformer_blocks
from caldpo.train.tiny import tiny_model_dir
from test_layout import EOS, RTOL, _pairs, _rel


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32, attn_implementation=register())
    model = LogProbModel(lm, "torch")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in transformer_blocks(lm, "GPTNeoXLayer"):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    examples = _pairs()
    batch = collate(examples, EOS)
    padded = concatenated(batch, torch.device("cpu"))
    assert padded["attention_mask"] is None  # right padding: the no-mask path
    width = padded["input_ids"].shape[1]
    mask = torch.cat([torch.nn.functional.pad(batch[f"{s}_attention_mask"], (0, width - batch[f"{s}_attention_mask"].shape[1]))
                      for s in ("chosen", "rejected")])
    inputs = {"padded": {**padded, "attention_mask": mask}, "padded/no mask": padded}
    for layout in ("packed", "prefix_shared"):
        inputs[layout] = {"packed": pack(examples, layout, sft=False, pad_token_id=EOS)}
        inputs[f"{layout}/segments"] = {"packed": pack(examples, layout, sft=False, pad_token_id=EOS, segments=True)}
    weights = torch.linspace(0.5, 1.5, 2 * len(examples))
    results = {}
    for layout, kw in inputs.items():
        model.zero_grad(set_to_none=True)
        logps = model(**kw)
        (logps * weights).sum().backward()
        grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[layout] = (logps.detach(), grads)
    ref_logps, ref_grads = results["padded"]
    for layout in [k for k in inputs if k != "padded"]:
        logps, grads = results[layout]
        assert _rel(logps, ref_logps) <= RTOL, (layout, logps, ref_logps)
        assert grads.keys() == ref_grads.keys()
        for k, g in ref_grads.items():
            assert _rel(grads[k], g) <= RTOL, (layout, k, _rel(grads[k], g))
    (out / f"ok{rank}").write_text("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
