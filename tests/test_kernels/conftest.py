"""Shared fixtures for kernel tests: a fresh random seed per test and a float64 oracle.

Each test draws a new seed from os.urandom (or CALDPO_TEST_SEED to replay one)
and prints it, so a failure's captured output names the seed that broke it.
"""
import os

import pytest
import torch


@pytest.fixture
def gen(request):
    """A torch.Generator seeded freshly per test; the seed is printed for replay."""
    seed = int(os.environ.get("CALDPO_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"[seed] {request.node.nodeid}: CALDPO_TEST_SEED={seed}")
    g = torch.Generator().manual_seed(seed)
    return g


def oracle_logprobs(hidden, weight, targets, ignore_index=-100):
    """Independent float64 formula: log_softmax(h @ w.T) gathered at targets, 0 where ignored."""
    logits = hidden.double() @ weight.double().T
    logp = torch.log_softmax(logits, dim=-1)
    keep = targets != ignore_index
    picked = logp.gather(1, torch.where(keep, targets, 0).unsqueeze(1)).squeeze(1)
    return picked * keep


def oracle_head_logprobs(hidden, weight, targets, bias=None, scale=1.0, softcap=None, ignore_index=-100):
    """Independent float64 formula for a head with bias, scale and soft-cap:
    log_softmax(cap * tanh(scale * (h @ w.T + b) / cap)) gathered at targets, 0 where ignored."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1)
    keep = targets != ignore_index
    return logp.gather(1, torch.where(keep, targets, 0).unsqueeze(1)).squeeze(1) * keep


HEADS = [  # (bias std, scale, softcap): Phi-like bias, Cohere-like scale, Granite-like 1/8, Gemma-like cap
    (2.0, 1.0, None), (0.0, 0.0625, None), (0.0, 1 / 8, None), (0.0, 1.0, 3.0), (1.0, 0.5, 2.0)]


def make_head(gen, v, dtype, bias_std, scale, softcap):
    """A random bias [v] in `dtype` (None when bias_std is 0) and the head's keyword arguments."""
    bias = None if not bias_std else (torch.randn(v, generator=gen, dtype=torch.float64) * bias_std).to(dtype)
    return dict(bias=bias, scale=scale, softcap=softcap)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64 (absolute error when ref is zero)."""
    out, ref = out.detach().double(), ref.detach().double()
    den = ref.norm()
    num = (out - ref).norm()
    return (num / den).item() if den > 0 else num.item()


def tol(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}[dtype]


def make_inputs(gen, n, h, v, dtype, scale=1.0, ignore_frac=0.3):
    """Random hidden [n,h], weight [v,h] (logit std about `scale`), targets with ignored slots."""
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (scale / h ** 0.5)
    targets = torch.randint(0, v, (n,), generator=gen)
    drop = torch.rand(n, generator=gen) < ignore_frac
    targets[drop] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def eager_and_compiled(step, x):
    """step(x) and its gradient, eager and under torch.compile(fullgraph=True), on two copies of x:
    ((value, grad) eager, (value, grad) compiled)."""
    x1, x2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    eager = step(x1)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True)(x2)
    compiled.backward()
    return (eager, x1.grad), (compiled, x2.grad)
