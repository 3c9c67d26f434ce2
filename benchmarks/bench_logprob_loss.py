"""Micro-benchmark of the log-prob + preference-loss stage of a Cal-DPO step.

One step = policy path forward+backward (hidden [2P,T,H] and head weight [V,H]
both need grad) + reference path forward only (its own hidden and weight, no
grad) + the loss over P pairs (mean), then backward. Labels follow the Hugging
Face shift; about half of each sequence is prompt (label -100).

Methods, all run in this one process on the same inputs:
  ours       caldpo.kernels.sequence_logprobs + preference_loss (Cal-DPO)
  naive      logits = hidden @ W.T, log_softmax in fp32, gather (Cal-DPO)
  liger_dpo  liger_kernel.chunked_loss.LigerFusedLinearDPOLoss: DPO (sigmoid),
             not Cal-DPO; summed log-probs, mean over pairs, no NLL term.
             Its log-probs are checked against the same reference; its loss
             and gradients against a float64 DPO reference.
  cce        cut_cross_entropy.linear_cross_entropy(reduction="none", shift=True)
             summed per sequence, then Cal-DPO (impl "cce" on CUDA, with its
             default gradient filtering; "torch_compile" on CPU).
  torch_lce  torch.nn.functional.linear_cross_entropy(reduction="none", chunked
             options where this torch has them), summed, then Cal-DPO.

Every method's loss, policy log-probs and gradients are compared with a float64
computation on the same inputs (relative error ||x - ref|| / ||ref||).

Peak memory is the peak of tensor bytes allocated during one step above what
was allocated before it: torch.cuda.max_memory_allocated on CUDA; on CPU the
same quantity from the torch profiler's allocation events (every tensor that
torch or compiled code allocates through the CPU allocator), so both devices
count tensors, not allocator caches or process RSS.

Work counted per step: 8*N*H*V (policy fwd+bwd) + 2*N*H*V (reference fwd),
with N the number of scored (non-prompt) tokens, compared with the measured
rate of a plain matmul [N,H] @ [H,V] in the same dtype.

Variants of ours are caldpo.kernels.KernelOptions values, one per method, so several
settings run side by side in one process: a backend name ("auto", "torch", "native"),
"triton-gemm" / "triton-fused" (the Triton forms), and "@<MiB>" for a block budget
("native@1": the native backend with 1 MiB logits blocks).

`--contend N` starts N competing CPU-bound processes (each a single-threaded fp32 matmul
loop) for the whole run, as when other jobs share the cores; the JSON and the table
say so, with the load average at the start and end of each shape.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

IGNORE = -100
BETA = 0.1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Shape:
    name: str
    pairs: int
    seq: int
    hidden: int
    vocab: int

    @property
    def tokens(self) -> int:
        return 2 * self.pairs * self.seq


# Pythia heads: 410m (H 1024), 1.4b (2048), 2.8b (2560); V 50304.
PRESETS = {
    "cuda": [Shape("pythia-410m", 8, 1024, 1024, 50304),
             Shape("pythia-1.4b", 8, 1024, 2048, 50304),
             Shape("pythia-2.8b", 8, 1024, 2560, 50304)],
    "cpu": [Shape("cpu-s", 2, 512, 256, 8192),
            Shape("cpu-m", 2, 512, 512, 8192)],
    # Real vocabularies on a 2-core CPU, at the presets' widths: Pythia (V 50304; H 512 = 70m,
    # 768 = 160m), Llama-3 (V 128256, H 2048 = Llama-3.2-1B) and Qwen2 (V 151936, H 896 =
    # Qwen2-0.5B); 8 sequences of 256 tokens (2 of 256 and 2 of 128 for the two largest heads,
    # to keep a step of every method within seconds), about half of each sequence prompt.
    "cpu-vocab": [Shape("cpu-v8k", 4, 256, 512, 8192),
                  Shape("pythia-70m-cpu", 4, 256, 512, 50304),
                  Shape("pythia-160m-cpu", 4, 256, 768, 50304),
                  Shape("llama3-1b-cpu", 1, 128, 2048, 128256),
                  Shape("qwen2-0.5b-cpu", 1, 256, 896, 151936)],
    "quick": [Shape("tiny", 2, 64, 32, 512)],
}


def parse_shape(text: str) -> list[Shape]:
    """A preset name ('cuda', 'cpu', 'quick', or one shape's name) or PxTxHxV."""
    for group in PRESETS.values():
        for s in group:
            if s.name == text:
                return [s]
    if text in PRESETS:
        return list(PRESETS[text])
    try:
        p, t, h, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"bad shape {text!r}: use a preset name or PxTxHxV (pairs x seq x hidden x vocab)")
    return [Shape(text, p, t, h, v)]


# ----------------------------------------------------------------------------- inputs

def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """Random inputs; rows 0..P-1 are chosen, P..2P-1 rejected (same prompts)."""
    b, t, h, v = 2 * shape.pairs, shape.seq, shape.hidden, shape.vocab

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale)

    hid = randn(b, t, h)
    w = randn(v, h, scale=2.0 / math.sqrt(h))  # logits with std ~2
    ref_hid = hid + randn(b, t, h, scale=0.05)
    ref_w = w + randn(v, h, scale=0.05 / math.sqrt(h))
    labels = torch.randint(0, v, (b, t), generator=gen)
    lo, hi = int(0.4 * t), int(0.6 * t)
    prompt = torch.randint(lo, max(hi, lo + 1), (shape.pairs,), generator=gen).repeat(2)
    labels[torch.arange(t).unsqueeze(0) < prompt.unsqueeze(1)] = IGNORE
    return {
        "hidden": hid.to(device, dtype).requires_grad_(True),
        "weight": w.to(device, dtype).requires_grad_(True),
        "ref_hidden": ref_hid.to(device, dtype),
        "ref_weight": ref_w.to(device, dtype),
        "labels": labels.to(device),
    }


def scored_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


# ----------------------------------------------------------------------------- losses

def caldpo_losses(pc, pr, rc, rr, beta=BETA):
    """Cal-DPO per pair: -logsigmoid(h_w - h_l) + (h_w - 1/2b)^2 + (h_l + 1/2b)^2."""
    hw, hl = pc - rc, pr - rr
    tgt = 1.0 / (2.0 * beta)
    return -F.logsigmoid(hw - hl) + (hw - tgt) ** 2 + (hl + tgt) ** 2


def dpo_losses(pc, pr, rc, rr, beta=BETA):
    """DPO (sigmoid) per pair: -logsigmoid(beta (h_w - h_l))."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


LOSS_FNS = {"caldpo": caldpo_losses, "dpo": dpo_losses}


def _pair_loss(seq_policy: torch.Tensor, seq_ref: torch.Tensor, kind="caldpo") -> torch.Tensor:
    p = seq_policy.shape[0] // 2
    losses = LOSS_FNS[kind](seq_policy[:p].float(), seq_policy[p:].float(),
                            seq_ref[:p].float(), seq_ref[p:].float())
    return losses.mean()


# ----------------------------------------------------------------------------- float64 reference

def reference64(inp: dict, kind: str, chunk_tokens: int = 1024) -> dict:
    """Float64 loss, policy log-probs and gradients, chunked so [N,V] is never held."""
    labels = inp["labels"]
    b, t = labels.shape
    tgt = labels[:, 1:].reshape(-1)
    keep = (tgt != IGNORE).nonzero().squeeze(1)
    seq_id = (torch.arange(b, device=labels.device).unsqueeze(1).expand(b, t - 1).reshape(-1))[keep]
    tgt = tgt[keep]

    def rows(hidden):
        return hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep].double()

    def seq_logps(x, w):
        out = torch.zeros(b, dtype=torch.float64, device=x.device)
        lse = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
        for s in range(0, x.shape[0], chunk_tokens):
            xc = x[s:s + chunk_tokens]
            lse_c = torch.logsumexp(xc @ w.T, dim=1)
            lse[s:s + chunk_tokens] = lse_c
            tok = (xc * w[tgt[s:s + chunk_tokens]]).sum(1) - lse_c
            out.index_add_(0, seq_id[s:s + chunk_tokens], tok)
        return out, lse

    with torch.no_grad():  # one float64 weight at a time (a Llama-3 head is 2 GiB in float64)
        xr, wr = rows(inp["ref_hidden"]), inp["ref_weight"].double()
        ref, _ = seq_logps(xr, wr)
        del xr, wr
        x, w = rows(inp["hidden"]), inp["weight"].double()
        pol, lse = seq_logps(x, w)
    pol_leaf = pol.clone().requires_grad_(True)
    p = b // 2
    loss = LOSS_FNS[kind](pol_leaf[:p], pol_leaf[p:], ref[:p], ref[p:]).mean()
    (g_seq,) = torch.autograd.grad(loss, pol_leaf)
    with torch.no_grad():
        g_tok = g_seq[seq_id]
        gx = torch.empty_like(x)
        gw = torch.zeros_like(w)
        for s in range(0, x.shape[0], chunk_tokens):
            e = min(s + chunk_tokens, x.shape[0])
            xc, g = x[s:e], g_tok[s:e]
            d = torch.exp(xc @ w.T - lse[s:e].unsqueeze(1)).mul_(-g.unsqueeze(1))
            d[torch.arange(e - s, device=d.device), tgt[s:e]] += g
            gx[s:e] = d @ w
            gw.addmm_(d.T, xc)
        gh = torch.zeros(b * (t - 1), x.shape[1], dtype=torch.float64, device=x.device)
        gh[keep] = gx
        grad_hidden = torch.zeros(inp["hidden"].shape, dtype=torch.float64, device=x.device)
        grad_hidden[:, :-1] = gh.view(b, t - 1, -1)
    return {"loss": loss.detach(), "logps": pol, "grad_hidden": grad_hidden, "grad_weight": gw}


def rel_err(x, ref) -> float:
    x = x.detach().double()
    ref = ref.detach().double()
    if not torch.isfinite(x).all():
        return float("nan")
    den = ref.norm().item()
    return (x - ref).norm().item() / (den if den > 0 else 1.0)


# ----------------------------------------------------------------------------- methods
# Each method: setup(shape, device, dtype) -> step(inp) -> (loss, policy_logps or None).
# `step` runs forward and the loss; the harness calls loss.backward().

class Missing(Exception):
    """The peer is not installed or not usable here; the message says why."""


def _version(mod_name: str, dist_name: str) -> str:
    try:
        from importlib.metadata import version
        return version(dist_name)
    except Exception:
        mod = sys.modules.get(mod_name)
        return getattr(mod, "__version__", "unknown")


# Variants of the Triton backend by the forms of its two steps for 16-bit inputs (see
# caldpo/kernels/triton_logprobs.py): every step as cuBLAS GEMM + Triton pass, or every step fused.
TRITON_FORMS = {"triton-gemm": ("gemm", "gemm"), "triton-fused": ("fused", "fused")}


def ours_options(variant: str):
    """KernelOptions for a variant: "<backend>[@<MiB>]", or "triton-gemm" / "triton-fused"."""
    from caldpo.kernels import KernelOptions
    name, _, mib = variant.partition("@")
    kw = {}
    if mib:
        kw["block_bytes"] = int(float(mib) * 2**20)
    if name in TRITON_FORMS:
        kw.update(backend="triton", forward_form=TRITON_FORMS[name][0], backward_form=TRITON_FORMS[name][1])
    else:
        kw["backend"] = name
    return KernelOptions(**kw)


def setup_ours(variant: str):
    def setup(shape, device, dtype):
        try:
            from caldpo.kernels import preference_loss, resolve_backend, sequence_logprobs
        except Exception as e:  # pragma: no cover - the package is part of this repo
            raise Missing(f"caldpo.kernels import failed: {e}")
        opts = ours_options(variant)
        resolved = resolve_backend(opts.backend, device)
        opts = opts.replace(backend=resolved)
        forms = (opts.forward_form, opts.backward_form) if resolved == "triton" else None
        if forms is not None:
            from caldpo.kernels import triton_logprobs

        def step(inp):
            pol = sequence_logprobs(inp["hidden"], inp["weight"], inp["labels"], options=opts)
            with torch.no_grad():
                ref = sequence_logprobs(inp["ref_hidden"], inp["ref_weight"], inp["labels"], options=opts)
            p = pol.shape[0] // 2
            losses, _, _ = preference_loss(pol[:p], pol[p:], ref[:p], ref[p:], BETA, loss="caldpo")
            if forms is not None and "triton" not in info:  # what the autotuners settled on (first call)
                info["triton"] = f"forward {forms[0]}, backward {forms[1]}; " + "; ".join(
                    f"{k} tile {getattr(getattr(triton_logprobs, f'_{k}_kernel_tuned'), 'best_config', None)}"
                    for k, form in (("fwd", forms[0]), ("bwd", forms[1])) if form == "fused")
            return losses.mean(), pol
        budget = opts.budget(device.type == "cuda")
        info = {"computes": "caldpo", "backend": resolved, "options": opts.encode(),
                "impl": f"{resolved}, {budget / 2**20:g} MiB blocks"}
        return step, info
    return setup


def _naive_seq_logps(hidden, weight, labels):
    logits = hidden[:, :-1] @ weight.T
    if logits.element_size() < 4:  # bf16/fp16: softmax in fp32, as training code does
        logits = logits.float()
    tgt = labels[:, 1:]
    mask = tgt != IGNORE
    tok = logits.log_softmax(-1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def setup_naive(shape, device, dtype):
    def step(inp):
        pol = _naive_seq_logps(inp["hidden"], inp["weight"], inp["labels"])
        with torch.no_grad():
            ref = _naive_seq_logps(inp["ref_hidden"], inp["ref_weight"], inp["labels"])
        return _pair_loss(pol, ref), pol
    return step, {"computes": "caldpo", "impl": "materialised fp32 logits"}


def setup_liger(shape, device, dtype):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except Exception as e:
        raise Missing(f"liger-kernel not importable: {type(e).__name__}: {e}")
    loss_mod = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=BETA, compute_nll_loss=False,
                                       compiled=True, use_ref_model=True, average_log_prob=False,
                                       chunk_size=1, loss_type="sigmoid")

    def step(inp):
        # Liger does no label shift: hidden[:, t] is scored against target[:, t].
        x = inp["hidden"][:, :-1].contiguous()
        xr = inp["ref_hidden"][:, :-1].contiguous()
        tgt = inp["labels"][:, 1:].contiguous()
        loss, aux = loss_mod(inp["weight"], x, tgt, ref_input=xr, ref_weight=inp["ref_weight"])
        return loss, torch.cat([aux[0], aux[1]])
    return step, {"computes": "dpo", "version": _version("liger_kernel", "liger-kernel"),
                  "config": "LigerFusedLinearDPOLoss(beta=0.1, loss_type='sigmoid', average_log_prob=False, "
                            "compute_nll_loss=False, use_ref_model=True, compiled=True, chunk_size=1)"}


def setup_cce(shape, device, dtype):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:
        raise Missing(f"cut-cross-entropy not importable: {type(e).__name__}: {e}")
    impl = "cce" if device.type == "cuda" else "torch_compile"

    def seq(hidden, weight, labels):
        ce = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE,
                                  reduction="none", shift=True, impl=impl)
        return -ce.float().sum(-1)

    def step(inp):
        pol = seq(inp["hidden"], inp["weight"], inp["labels"])
        with torch.no_grad():
            ref = seq(inp["ref_hidden"], inp["ref_weight"], inp["labels"])
        return _pair_loss(pol, ref), pol
    return step, {"computes": "caldpo", "impl": impl,
                  "version": _version("cut_cross_entropy", "cut-cross-entropy")}


def setup_torch_lce(shape, device, dtype):
    if not hasattr(F, "linear_cross_entropy"):
        raise Missing(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    opts_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    opts = opts_cls() if opts_cls is not None else None

    def seq(hidden, weight, labels):
        b, t, h = hidden.shape
        tgt = torch.full_like(labels, IGNORE)
        tgt[:, :-1] = labels[:, 1:]
        ce = F.linear_cross_entropy(hidden.reshape(b * t, h), weight, tgt.reshape(-1),
                                    reduction="none", ignore_index=IGNORE, options=opts)
        return -ce.float().view(b, t).sum(-1)

    def step(inp):
        pol = seq(inp["hidden"], inp["weight"], inp["labels"])
        with torch.no_grad():
            ref = seq(inp["ref_hidden"], inp["ref_weight"], inp["labels"])
        return _pair_loss(pol, ref), pol
    return step, {"computes": "caldpo",
                  "impl": "chunked (LinearCrossEntropyOptions())" if opts is not None else "reference path"}


PEERS = {"naive": setup_naive, "liger_dpo": setup_liger, "cce": setup_cce, "torch_lce": setup_torch_lce}


# ----------------------------------------------------------------------------- measurement

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step(step, inp):
    inp["hidden"].grad = None
    inp["weight"].grad = None
    loss, logps = step(inp)
    loss.backward()
    return loss, logps


def timed_step(step, inp, device) -> float:
    """Seconds for one step (CUDA events on GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        sync(device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run_step(step, inp)
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    t0 = time.perf_counter()
    run_step(step, inp)
    return time.perf_counter() - t0


def cpu_peak_bytes(fn):
    """(result, peak tensor bytes live during fn above the level at its start).

    Read from the profiler's allocation records: every allocation and free
    through torch's CPU allocator, compiled (inductor) code included.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    allocs = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)
    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    allocs.sort(key=lambda a: a[0])  # stable: equal stamps keep record order
    live = peak = 0
    for _, size in allocs:
        live += size
        peak = max(peak, live)
    return out, peak


def check_step(step, inp, device):
    """One untimed step: (loss, logps, grad_hidden, grad_weight, peak bytes)."""
    if device.type == "cuda":
        inp["hidden"].grad = None
        inp["weight"].grad = None
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss, logps = run_step(step, inp)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        inp["hidden"].grad = None
        inp["weight"].grad = None
        (loss, logps), peak = cpu_peak_bytes(lambda: run_step(step, inp))
    return loss.detach(), (None if logps is None else logps.detach()), inp["hidden"].grad, inp["weight"].grad, peak


def setup_matmul(n: int, h: int, v: int, device, dtype, gen):
    """A plain [n,h] @ [h,v] matmul on random data: the rate the methods are compared with.

    The output is preallocated so that the CPU figure is not page-fault bound.
    """
    a = torch.randn(n, h, generator=gen).to(device, dtype)
    b = torch.randn(v, h, generator=gen).to(device, dtype)
    c = torch.empty(n, v, device=device, dtype=dtype)

    def run():
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            torch.mm(a, b.T, out=c)
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / 1e3
        t0 = time.perf_counter()
        torch.mm(a, b.T, out=c)
        return time.perf_counter() - t0
    return run


# ----------------------------------------------------------------------------- environment

def environment(device) -> dict:
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    for mod, dist in (("triton", "triton"), ("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy")):
        try:
            from importlib.metadata import version
            env[dist] = version(dist)
        except Exception:
            env[dist] = None
    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
                break
    except Exception:
        pass
    env["cpu_model"] = cpu
    env["cpu_count"] = os.cpu_count()
    env["loadavg_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = cpu
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except Exception:
        env["git_commit"] = None
    return env


# ----------------------------------------------------------------------------- contention

# One competing process: a single-threaded fp32 matmul loop (CPU and memory traffic, like another
# job's training step) that exits when its parent is gone or after `limit` seconds.
CONTENDER = """
import os, sys, time
import torch
torch.set_num_threads(1)
parent, limit, t0 = int(sys.argv[1]), float(sys.argv[2]), time.time()
a, b = torch.randn(256, 256), torch.randn(256, 256)
while os.getppid() == parent and time.time() - t0 < limit:
    for _ in range(50):
        torch.mm(a, b)
"""


def start_contenders(n: int, limit_s: float = 3600.0) -> list:
    """Starts `n` competing CPU-bound processes (see CONTENDER); returns their Popen objects."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(os.getpid()), str(limit_s)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
    time.sleep(3.0 if n else 0.0)  # past their torch import: they are computing when timing starts
    dead = [p.pid for p in procs if p.poll() is not None]
    if dead:
        stop_contenders(procs)
        raise SystemExit(f"--contend: competing process(es) {dead} exited at once")
    return procs


def stop_contenders(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


# ----------------------------------------------------------------------------- driver

def bench_shape(shape, methods, device, dtype, reps, warmup, gen, deadline, log) -> dict:
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    inp = make_inputs(shape, device, dtype, gen)
    n_scored = scored_tokens(inp["labels"])
    flops = 10.0 * n_scored * shape.hidden * shape.vocab
    res = {"shape": asdict(shape), "tokens": shape.tokens, "scored_tokens": n_scored, "flops_per_step": flops,
           "methods": {}, "loadavg_start": load0}
    t0 = time.perf_counter()
    refs = {kind: reference64(inp, kind) for kind in ("caldpo", "dpo")}
    res["reference_s"] = time.perf_counter() - t0
    res["reference_loss"] = {k: float(r["loss"]) for k, r in refs.items()}
    mm = setup_matmul(n_scored, shape.hidden, shape.vocab, device, dtype, gen)
    for _ in range(3):
        mm()
    mm_times = []

    steps = {}
    for name, setup in methods.items():
        entry = res["methods"].setdefault(name, {})
        if time.perf_counter() > deadline:
            entry.update(status="skipped", reason="time budget exhausted")
            continue
        try:
            step, info = setup(shape, device, dtype)
            entry.update(info)
            t_w = time.perf_counter()
            for _ in range(warmup):
                run_step(step, inp)
            sync(device)
            entry["warmup_s"] = time.perf_counter() - t_w
            entry.update(info)  # what the warm-up learnt (e.g. an autotuned tile)
            loss, logps, gh, gw, peak = check_step(step, inp, device)
            ref = refs[entry["computes"]]
            entry["peak_mem_bytes"] = int(peak)
            entry["loss"] = float(loss)
            entry["err"] = {
                "loss": rel_err(loss, ref["loss"]),
                "logps": rel_err(logps, ref["logps"]) if logps is not None else None,
                "grad_hidden": rel_err(gh, ref["grad_hidden"]) if gh is not None else None,
                "grad_weight": rel_err(gw, ref["grad_weight"]) if gw is not None else None,
            }
            entry["status"] = "ok"
            entry["times_s"] = []
            steps[name] = step
            log(f"  {name}: warm-up {entry['warmup_s']:.1f}s, loss rel err {entry['err']['loss']:.2e}")
        except Missing as e:
            entry.update(status="missing", reason=str(e))
            log(f"  {name}: missing ({e})")
        except Exception as e:
            entry.update(status="error", reason=f"{type(e).__name__}: {str(e)[:500]}")
            log(f"  {name}: error\n" + traceback.format_exc(limit=3))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            inp["hidden"].grad = None
            inp["weight"].grad = None

    # Interleave the timed reps (and the matmul) so that drift in machine speed hits all alike.
    for r in range(reps):
        mm_times.append(mm())
        for name, step in list(steps.items()):
            entry = res["methods"][name]
            if time.perf_counter() > deadline and len(entry["times_s"]) >= 1:
                entry["note"] = f"time budget: {len(entry['times_s'])} reps"
                continue
            try:
                entry["times_s"].append(timed_step(step, inp, device))
            except Exception as e:
                entry.update(status="error", reason=f"{type(e).__name__}: {str(e)[:500]}")
                steps.pop(name)
    res["matmul_times_s"] = mm_times
    res["matmul_flops_per_s"] = 2.0 * n_scored * shape.hidden * shape.vocab / statistics.median(mm_times)
    for name, entry in res["methods"].items():
        if entry.get("status") == "ok" and entry.get("times_s"):
            t = statistics.median(entry["times_s"])
            entry["time_s"] = t
            entry["time_min_s"] = min(entry["times_s"])
            entry["flops_per_s"] = flops / t
            entry["frac_matmul"] = entry["flops_per_s"] / res["matmul_flops_per_s"]
    base = next((e for n, e in res["methods"].items() if n.startswith("ours") and "time_s" in e), None)
    for entry in res["methods"].values():
        if base is not None and "time_s" in entry:
            entry["time_vs_ours"] = entry["time_s"] / base["time_s"]
            entry["time_min_vs_ours"] = entry["time_min_s"] / base["time_min_s"]
            if base["peak_mem_bytes"] > 0:
                entry["mem_vs_ours"] = entry["peak_mem_bytes"] / base["peak_mem_bytes"]
    del inp
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return res


def fmt_table(results: dict) -> str:
    dev = results["env"]
    tflop_unit = 1e12 if results["device"] == "cuda" else 1e9
    unit = "TFLOP/s" if results["device"] == "cuda" else "GFLOP/s"
    lines = [f"# {dev['device_name']} | torch {dev['torch']} | {results['dtype']} | "
             f"reps {results['reps']} (median) | {dev['date']}"]
    if results.get("contend"):
        lines.append(f"# contended: {results['contend']['processes']} competing processes "
                     f"({results['contend']['kind']}) ran for the whole benchmark")
    for sr in results["shapes"]:
        s = sr["shape"]
        lines.append("")
        load = ""
        if sr.get("loadavg_start") and sr.get("loadavg_end"):
            load = f"; load average (1 min) {sr['loadavg_start'][0]:.1f} -> {sr['loadavg_end'][0]:.1f}"
        lines.append(f"## {s['name']}: P={s['pairs']} pairs, T={s['seq']}, H={s['hidden']}, V={s['vocab']}; "
                     f"{sr['tokens']} tokens, {sr['scored_tokens']} scored; "
                     f"matmul {sr['matmul_flops_per_s'] / tflop_unit:.1f} {unit}{load}")
        hdr = (f"{'method':<12} {'loss':<6} {'time ms':>9} {'x ours':>7} {'min ms':>9} {'x ours':>7} "
               f"{'peak MiB':>9} {'x ours':>7} "
               f"{unit:>8} {'%mm':>5} {'err loss':>9} {'err logp':>9} {'err dH':>9} {'err dW':>9}")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for name, e in sr["methods"].items():
            if e.get("status") != "ok" or "time_s" not in e:
                lines.append(f"{name:<12} {e.get('status', '?')}: {e.get('reason', '')[:100]}")
                continue
            err = e["err"]

            def f(x):
                return f"{x:9.1e}" if x is not None else f"{'-':>9}"
            lines.append(
                f"{name:<12} {e['computes']:<6} {e['time_s'] * 1e3:9.1f} {e.get('time_vs_ours', float('nan')):7.2f} "
                f"{e['time_min_s'] * 1e3:9.1f} {e.get('time_min_vs_ours', float('nan')):7.2f} "
                f"{e['peak_mem_bytes'] / 2**20:9.1f} {e.get('mem_vs_ours', float('nan')):7.2f} "
                f"{e['flops_per_s'] / tflop_unit:8.1f} {100 * e['frac_matmul']:5.0f} "
                f"{f(err['loss'])} {f(err['logps'])} {f(err['grad_hidden'])} {f(err['grad_weight'])}")
        for name, e in sr["methods"].items():
            if e.get("triton"):
                lines.append(f"  ({name}: Triton {e['triton']})")
            elif e.get("impl") and name.startswith("ours"):
                lines.append(f"  ({name}: {e['impl']})")
    missing = results.get("missing_peers")
    if missing:
        lines.append("")
        lines.append("missing peers: " + "; ".join(f"{k} ({v})" for k, v in missing.items()))
    lines.append("")
    lines.append("time: median of the reps (min: fastest rep); x ours: method / ours (above 1: ours faster or "
                 "smaller). err: ||x-ref||/||ref|| against float64 on the same inputs (liger_dpo: float64 DPO). "
                 f"{unit} counts 10*N*H*V, N = scored tokens; %mm: of a plain matmul [N,H]@[H,V] timed alongside.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="preset names (cuda, cpu, quick, pythia-410m, ...) or PxTxHxV")
    ap.add_argument("--reps", type=int, default=None, help="timed reps per method (median reported)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before the checked step")
    ap.add_argument("--quick", action="store_true", help="tiny shape, 2 reps: a smoke test")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--ours-backends", default="auto",
                    help="comma list of caldpo backends to run (the first is the ratio baseline); "
                         "triton-gemm / triton-fused: the Triton backend with all-GEMM or all-fused forms")
    ap.add_argument("--methods", default="naive,liger_dpo,cce,torch_lce", help="comma list of peers to run")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="stop starting new work after this many seconds (0: no limit)")
    ap.add_argument("--seed", type=int, default=None, help="input seed (default: fresh, recorded)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--contend", type=int, default=0, metavar="N",
                    help="start N competing CPU-bound processes (single-threaded matmul loops) for the run")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.shapes:
        shapes = [s for text in args.shapes for s in parse_shape(text)]
    else:
        shapes = PRESETS["quick"] if args.quick else (PRESETS["cpu"] + PRESETS["cpu-vocab"] if device.type == "cpu"
                                                       else PRESETS[device.type])
    reps = args.reps if args.reps is not None else (2 if args.quick else (20 if device.type == "cuda" else 5))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick or device.type == "cpu" else 3)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s if args.budget_s > 0 else float("inf")
    sys.path.insert(0, REPO)

    methods = {}
    for i, be in enumerate(b.strip() for b in args.ours_backends.split(",") if b.strip()):
        ours_options(be)  # a bad variant stops here, before any work
        methods["ours" if i == 0 else f"ours_{be}"] = setup_ours(be)
    for name in (m.strip() for m in args.methods.split(",") if m.strip()):
        if name not in PEERS:
            raise SystemExit(f"unknown method {name!r}; expected some of {sorted(PEERS)}")
        methods[name] = PEERS[name]

    results = {"device": device.type, "dtype": str(dtype).replace("torch.", ""), "reps": reps, "warmup": warmup,
               "seed": seed, "beta": BETA, "env": environment(device), "shapes": [],
               "argv": sys.argv[1:] if argv is None else list(argv)}

    def log(msg):
        print(msg, flush=True)

    def save():
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    contenders = start_contenders(args.contend) if args.contend else []
    if contenders:
        results["contend"] = {"processes": len(contenders), "pids": [p.pid for p in contenders],
                              "kind": "single-threaded fp32 256x256 matmul loop each"}
        log(f"contending: started {len(contenders)} competing CPU-bound processes (pids "
            f"{', '.join(str(p.pid) for p in contenders)}), running until the benchmark ends")
    try:
        for shape in shapes:
            log(f"[{time.perf_counter() - t_start:6.1f}s] shape {shape.name} ({shape.tokens} tokens, "
                f"H={shape.hidden}, V={shape.vocab}, {results['dtype']})")
            if time.perf_counter() > deadline:
                results["shapes"].append({"shape": asdict(shape), "skipped": "time budget exhausted"})
                continue
            results["shapes"].append(bench_shape(shape, methods, device, dtype, reps, warmup, gen, deadline, log))
            results["missing_peers"] = {n: e["reason"] for sr in results["shapes"]
                                        for n, e in sr.get("methods", {}).items() if e.get("status") == "missing"}
            save()
    finally:
        if contenders:
            alive = sum(p.poll() is None for p in contenders)
            stop_contenders(contenders)
            results["contend"]["alive_at_end"] = alive
            log(f"contending: stopped the {len(contenders)} competing processes ({alive} still running at the end)")
    results["shapes"] = [s for s in results["shapes"] if "methods" in s] + \
                        [s for s in results["shapes"] if "methods" not in s]
    results["wall_s"] = time.perf_counter() - t_start
    results["env"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    save()
    print()
    print(fmt_table({**results, "shapes": [s for s in results["shapes"] if "methods" in s]}))
    skipped = [s["shape"]["name"] for s in results["shapes"] if "methods" not in s]
    if skipped:
        print("shapes skipped (time budget): " + ", ".join(skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
