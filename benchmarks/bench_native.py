"""Native CPU backend vs the torch (chunked) backend: forward + backward of the inner functions.

Both run on the same compacted inputs (N scored tokens, fp32): forward -> (logp, lse),
then backward with a random upstream grad, both gradients. Reps are interleaved
(order alternating per rep) and the median is reported, so a noisy shared machine
affects both methods alike; compare the ratio column, not absolute times across runs.
Also printed: the time of one plain [N,H] @ [H,V] matmul (the forward's GEMM work alone;
forward + backward do 4x that work).

    python benchmarks/bench_native.py [--reps 9] [--threads 2]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from caldpo.kernels import chunked, native  # noqa: E402


def step(mod, hidden, weight, targets, grad):
    t0 = time.perf_counter()
    _, lse = mod.forward(hidden, weight, targets)
    t1 = time.perf_counter()
    mod.backward(grad, hidden, weight, targets, lse, True, True)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.available():
        sys.exit(f"native backend unavailable: {native.unavailable_reason()}")
    print(f"# bench_native  {datetime.datetime.now():%Y-%m-%d %H:%M}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  cpu {platform.processor() or platform.machine()}  "
          f"reps {args.reps} (interleaved, median)  fp32  N={args.tokens}")
    print(f"{'H':>5} {'V':>6} | {'mm ms':>7} | {'torch fwd':>9} {'bwd':>8} {'total':>8} | "
          f"{'native fwd':>10} {'bwd':>8} {'total':>8} | {'torch/native':>12}")
    gen = torch.Generator().manual_seed(0)
    for h in (256, 512):
        for v in (8192, 16384):
            n = args.tokens
            hidden = torch.randn(n, h, generator=gen)
            weight = torch.randn(v, h, generator=gen) / h ** 0.5
            targets = torch.randint(0, v, (n,), generator=gen)
            grad = torch.randn(n, generator=gen)
            out = torch.empty(n, v)
            times = {"torch": [], "native": [], "mm": []}
            mods = [("torch", chunked), ("native", native)]
            for rep in range(args.reps + 1):  # rep 0 warms up
                for name, mod in (mods if rep % 2 else mods[::-1]):
                    t = step(mod, hidden, weight, targets, grad)
                    if rep:
                        times[name].append(t)
                t0 = time.perf_counter()
                torch.mm(hidden, weight.T, out=out)
                if rep:
                    times["mm"].append((time.perf_counter() - t0, 0.0))
            med = {k: (statistics.median(a for a, _ in ts) * 1e3, statistics.median(b for _, b in ts) * 1e3,
                       statistics.median(a + b for a, b in ts) * 1e3) for k, ts in times.items()}
            tf, tb, tt = med["torch"]
            nf, nb, nt = med["native"]
            print(f"{h:>5} {v:>6} | {med['mm'][0]:>7.1f} | {tf:>9.1f} {tb:>8.1f} {tt:>8.1f} | "
                  f"{nf:>10.1f} {nb:>8.1f} {nt:>8.1f} | {tt / nt:>12.2f}")
            del out


if __name__ == "__main__":
    main()
