"""Forward and backward of the fused head apart, per backend, against a plain matmul (CUDA).

Where bench_logprob_loss.py times a whole Cal-DPO step, this splits the policy
head into its forward (2*N*H*V flops) and forward+backward (8*N*H*V) so that a
slow phase shows itself. All tokens are scored; inputs are bf16.

    python benchmarks/profile_head.py --tokens 8192 --hidden 1024,2048,2560
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from caldpo.kernels import KernelOptions, chunked, linear_logprobs, triton_logprobs  # noqa: E402

FORMS = {"triton-gemm": ("gemm", "gemm"), "triton-fused": ("fused", "fused")}


def variant_options(variant: str) -> KernelOptions:
    """KernelOptions of a variant: a backend name, triton-gemm / triton-fused (the Triton forms),
    or triton@<N>MiB (the default forms with an N MiB logits block)."""
    name, _, mib = variant.partition("@")
    kw = {"block_bytes": int(mib[:-3]) << 20} if mib else {}
    if name.startswith("triton"):
        fwd, bwd = FORMS.get(name, triton_logprobs.DEFAULT_FORMS)
        return KernelOptions(backend="triton", forward_form=fwd, backward_form=bwd, **kw)
    return KernelOptions(backend=name, **kw)


def cuda_time(fn, reps: int) -> float:
    """Median seconds of fn() over reps, after two warm-up calls (CUDA events)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def peak_extra(fn, clear) -> float:
    """MiB that one call of fn allocates above what was live before it (peak, CUDA allocator),
    after clear() has dropped what an earlier call left; the gradients it makes count."""
    clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8166, help="an odd count, as after dropping prompt tokens")
    ap.add_argument("--hidden", default="1024,2048,2560")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--backends", default="triton,triton-gemm,triton-fused,torch",
                    help="caldpo backends; triton-gemm / triton-fused: the Triton backend with all-GEMM "
                         "or all-fused forms (plain triton: its defaults)")
    ap.add_argument("--chunk-mib", default="32,64",
                    help="also time the default Triton forms with these KernelOptions.block_bytes (MiB): "
                         "the fp32 logits block of the GEMM forms, a speed-for-memory trade")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_head: needs a CUDA device", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, v, rows = args.tokens, args.vocab, []
    print(f"# {torch.cuda.get_device_name()} | N={n} V={v} bf16 | median of {args.reps}")
    print(f"{'H':>5} {'backend':<13} {'phase':<8} {'ms':>8} {'TFLOP/s':>8} {'%mm':>5} {'+MiB':>7}")
    for h in (int(x) for x in args.hidden.split(",")):
        x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, generator=gen)
        w = (torch.randn(v, h, device="cuda", generator=gen) / h ** 0.5).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device="cuda", generator=gen)
        out = torch.empty(n, v, device="cuda", dtype=torch.bfloat16)
        mm = cuda_time(lambda: torch.mm(x, w.T, out=out), args.reps)
        del out
        mm_rate = 2 * n * h * v / mm
        print(f"{h:>5} {'cuBLAS':<13} {'matmul':<8} {mm * 1e3:8.2f} {mm_rate / 1e12:8.1f} {100:5.0f}")
        chunks = [f"triton@{c}MiB" for c in args.chunk_mib.split(",") if c]
        for variant in args.backends.split(",") + chunks:
            opts = variant_options(variant)
            backend = opts.backend
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

            def fwd():
                with torch.no_grad():
                    linear_logprobs(x, w, t, options=opts)

            def clear():
                xg.grad = wg.grad = None

            def fwd_bwd():
                clear()
                linear_logprobs(xg, wg, t, options=opts).sum().backward()
            for phase, fn, flops in (("fwd", fwd, 2 * n * h * v), ("fwd+bwd", fwd_bwd, 8 * n * h * v)):
                sec = cuda_time(fn, args.reps)
                extra = peak_extra(fn, clear)
                rows.append(dict(hidden=h, backend=variant, phase=phase, ms=sec * 1e3, extra_mib=extra,
                                 tflops=flops / sec / 1e12, frac_mm=flops / sec / mm_rate))
                print(f"{h:>5} {variant:<13} {phase:<8} {sec * 1e3:8.2f} {flops / sec / 1e12:8.1f} "
                      f"{100 * flops / sec / mm_rate:5.0f} {extra:7.1f}")
            if backend == "triton":
                print(f"      {variant}: forward {opts.forward_form}, backward {opts.backward_form}, "
                      f"block {opts.budget(cuda=True) >> 20} MiB")
                for kind in ("fwd", "bwd"):
                    tuned = getattr(triton_logprobs, f"_{kind}_kernel_tuned")
                    print(f"      {variant} {kind} tile: {getattr(tuned, 'best_config', None)}")
        torch.cuda.empty_cache()
    print(f"fp32-output GEMM forms available: {chunked._CUDA_FORMS}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "tokens": n, "vocab": v,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
