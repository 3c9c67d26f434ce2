"""KernelOptions: settings as values passed to the kernels, not module state.

Two settings used alternately in one process each match the float64 formula; a block budget
reaches the kernel (the torch backend's block count, the native extension's arguments);
"auto" on CPU picks the native extension and falls back to torch, saying why once.
"""
import logging
import math

import pytest
import torch

from caldpo.kernels import KernelOptions, linear_logprobs, resolve_backend, sequence_logprobs
from caldpo.kernels import backends, chunked, logprobs, native
from caldpo.kernels import options as options_mod

from .conftest import make_inputs, oracle_logprobs, rel_err

NATIVE = native.available()


def grads_vs_oracle(hidden, weight, targets, g, options):
    """Relative errors of (log-probs, grad_hidden, grad_weight) against float64 autograd."""
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = oracle_logprobs(h64, w64, targets)
    ref_gh, ref_gw = torch.autograd.grad((ref * g).sum(), (h64, w64))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_logprobs(h, w, targets, options=options)
    out.backward(g.float())
    return rel_err(out, ref), rel_err(h.grad, ref_gh), rel_err(w.grad, ref_gw)


def test_two_settings_in_one_process(gen):
    """Settings that differ in backend, budget and axis, called alternately (a b a b): every call
    matches float64, so no call leaks its setting into the next."""
    n, v = 70, 157
    settings = [KernelOptions(backend="torch", block_bytes=9 * 4 * n, min_block=1, axis="vocab"),
                KernelOptions(backend="torch", block_bytes=11 * 4 * v, min_block=1, axis="tokens"),
                KernelOptions(backend="torch")]
    if NATIVE:
        settings += [KernelOptions(backend="native", block_bytes=13 * 4 * n, min_block=1),
                     KernelOptions(backend="native")]
    hidden, weight, targets = make_inputs(gen, n, 16, v, torch.float32, scale=4.0)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    for opts in settings + settings[::-1]:
        errs = grads_vs_oracle(hidden, weight, targets, g, opts)
        assert max(errs) < 1e-5, (opts, errs)


def test_block_budget_reaches_the_torch_kernel(gen, monkeypatch):
    """The block budget is what sets the number of vocabulary blocks: count the per-block merge."""
    calls = []
    orig = chunked._pick_lse
    monkeypatch.setattr(chunked, "_pick_lse", lambda *a: calls.append(1) or orig(*a))
    n, v = 24, 300
    hidden, weight, targets = make_inputs(gen, n, 8, v, torch.float32, ignore_frac=0.0)
    counts = {}
    for cols in (7, 50, 300, 7):
        calls.clear()
        opts = KernelOptions(backend="torch", block_bytes=cols * 4 * n, min_block=1, axis="vocab")
        out = linear_logprobs(hidden, weight, targets, options=opts)
        counts[cols] = len(calls)
        assert rel_err(out, oracle_logprobs(hidden, weight, targets)) < 1e-5
    assert counts == {7: math.ceil(v / 7), 50: 6, 300: 1}
    calls.clear()
    linear_logprobs(hidden, weight, targets, backend="torch")  # defaults: 16 MiB, one block here
    assert len(calls) == 1


@pytest.mark.skipif(not NATIVE, reason=f"native backend unavailable: {native.unavailable_reason()}")
def test_options_reach_the_native_extension(gen, monkeypatch):
    """The native backend hands the budget and the narrowest block to the C++ calls."""
    seen = []
    ext = native._require()

    class Spy:
        def forward(self, *a):
            seen.append(("forward", a[3], a[-1]))
            return ext.forward(*a)

        def backward(self, *a):
            seen.append(("backward", a[7], a[-1]))
            return ext.backward(*a)
    monkeypatch.setattr(native, "_require", Spy)
    hidden, weight, targets = make_inputs(gen, 10, 8, 41, torch.float32)
    h = hidden.clone().requires_grad_()
    linear_logprobs(h, weight, targets, options=KernelOptions(backend="native", block_bytes=4096, min_block=3)
                    ).sum().backward()
    sequence_logprobs(h.view(2, 5, 8), weight, targets.view(2, 5), backend="native").sum()
    assert seen == [("forward", 4096, 3), ("backward", 4096, 3), ("forward", options_mod.CPU_BLOCK_BYTES, 256)]


def test_backend_argument_and_options_backend(gen, monkeypatch):
    """options.backend is used when the backend argument is "auto"; an explicit argument wins."""
    used = []
    orig = logprobs.reference_linear_logprobs
    monkeypatch.setattr(logprobs, "reference_linear_logprobs", lambda *a, **k: used.append(1) or orig(*a, **k))
    hidden, weight, targets = make_inputs(gen, 9, 8, 23, torch.float32)
    ref = oracle_logprobs(hidden, weight, targets)
    assert rel_err(linear_logprobs(hidden, weight, targets, options=KernelOptions(backend="reference")), ref) < 1e-6
    assert len(used) == 1
    out = linear_logprobs(hidden, weight, targets, backend="torch", options=KernelOptions(backend="reference"))
    assert len(used) == 1 and rel_err(out, ref) < 1e-5


def test_values_validated_and_encoded():
    opts = KernelOptions(backend="native", block_bytes=1 << 20, min_block=64, axis="tokens", gemm="input",
                         forward_form="gemm", backward_form="fused")
    assert options_mod.decode(opts.encode()) == opts
    assert options_mod.decode(KernelOptions().encode()) == KernelOptions()
    assert hash(opts) == hash(opts.replace()) and opts.replace(min_block=1).min_block == 1
    with pytest.raises(AttributeError):
        opts.block_bytes = 5
    for bad in (dict(backend="fastest"), dict(block_bytes=0), dict(min_block=0), dict(axis="rows"),
                dict(gemm="bf16"), dict(forward_form="x"), dict(backward_form="atomic")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            KernelOptions(**bad)
    with pytest.raises(TypeError):
        linear_logprobs(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(2, dtype=torch.long), options="torch")
    cfg = {"backend": "torch", "block_bytes": None, "min_block": 8, "axis": "auto", "gemm": "auto",
           "forward_form": "fused", "backward_form": "gemm"}
    assert options_mod.from_config(cfg) == KernelOptions(backend="torch", min_block=8)


def test_auto_on_cpu_falls_back_to_torch_once(monkeypatch, caplog):
    """Without the native extension, "auto" on CPU is the torch path, and the reason is logged once."""
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no C++ compiler ('c++' not on PATH)")
    monkeypatch.setattr(backends, "_fallback_logged", type(backends._fallback_logged)())
    with caplog.at_level(logging.WARNING, logger="caldpo"):
        assert resolve_backend("auto", "cpu") == "torch"
        assert resolve_backend("auto", "cpu") == "torch"
    msgs = [r.getMessage() for r in caplog.records if "native" in r.getMessage()]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0]
    monkeypatch.setattr(native, "available", lambda: True)
    assert resolve_backend("auto", "cpu") == "native"


def test_logprob_model_passes_its_options(gen, monkeypatch):
    """caldpo.train.model.LogProbModel hands its KernelOptions to the head on every call: the
    block count follows the model's options, and the log-probs equal the model's own logits'."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from caldpo.train.model import LogProbModel

    v = 97
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    lm = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=v, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=32)).eval()
    ids = torch.randint(0, v, (2, 9), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        logits = lm(input_ids=ids).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = (lp * (labels[:, 1:] != -100)).sum(1)
    calls = []
    orig = chunked._pick_lse
    monkeypatch.setattr(chunked, "_pick_lse", lambda *a: calls.append(1) or orig(*a))
    for cols in (10, 50):
        calls.clear()
        model = LogProbModel(lm, options=KernelOptions(backend="torch", block_bytes=cols * 4 * 12, min_block=1))
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        assert rel_err(out, ref) < 1e-5
        assert len(calls) == math.ceil(v / cols)  # 12 scored tokens: blocks of `cols` columns
