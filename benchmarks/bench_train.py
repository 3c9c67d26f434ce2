"""End-to-end training throughput: the fused output head against materialised logits.

Runs the real trainer (``python -m caldpo.train``) for a few Cal-DPO steps twice on the
same model and data, once with ``kernels.backend=auto`` (fused: the native extension on CPU (chunked torch without a compiler),
Triton on CUDA) and once with ``kernels.backend=reference`` (full ``[tokens x vocab]``
logits), each in a fresh process, and prints tokens/s (median over the steps after
warm-up), step time and peak memory from the run's own metrics.

The model is a randomly initialised Pythia-shaped GPT-NeoX built locally (no download)
whose output vocabulary is widened to ``--vocab`` rows, so the head has a realistic
share of the work; the tokenizer is the tiny one, so only its ids are ever targets.

    python benchmarks/bench_train.py                       # CPU, small model
    python benchmarks/bench_train.py --device cuda --hidden 1024 --layers 8 --vocab 50304
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(model_dir: Path, backend: str, args, run_dir: Path) -> dict:
    over = ["model=hf", f"model.name_or_path={model_dir}", "model.block_name=GPTNeoXLayer", "datasets=[sample]",
            "loss=caldpo", "loss.beta=0.1", f"kernels.backend={backend}", f"device={args.device}",
            f"batch_size={args.batch_size}", f"n_examples={args.batch_size * args.steps}", "do_first_eval=false",
            "eval_every=100000000", "n_eval_examples=1", "eval_batch_size=1", "export_hf=false",
            f"max_length={args.max_length}", f"max_prompt_length={args.max_length // 2}", "lr=1e-6",
            f"run_dir={run_dir}", "resume=never"]
    if args.device == "cuda":
        over += ["trainer=FSDPTrainer", "model.fsdp_policy_mp=bfloat16", "model.reference_dtype=bfloat16"]
    else:
        over += ["model.reference_dtype=float32"]
    proc = subprocess.run([sys.executable, "-m", "caldpo.train", *over], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    all_steps = [r for r in recs if r.get("split") == "train" and "tokens_per_second" in r]
    steps = all_steps[args.warmup:]
    return {
        "step_times_all": [r["step_time"] for r in all_steps],  # warm-up included: outliers show compiles
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steps),
        "step_time": statistics.median(r["step_time"] for r in steps),
        "peak_memory_gb": max(r.get("peak_memory_gb", 0.0) for r in steps),
        "mfu": statistics.median(r["mfu"] for r in steps) if "mfu" in steps[0] else None,
        "steps_timed": len(steps),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backends", default="auto,reference",
                   help="kernels.backend values to run, each in its own process; auto and reference "
                        "are the two the speed-up compares")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    results = {"device": args.device, "machine": platform.processor() or platform.machine(), "args": vars(args)}
    from caldpo.train.tiny import build_random

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_random(Path(tmp) / "model", vocab=args.vocab, hidden_size=args.hidden,
                                 num_layers=args.layers, num_heads=args.heads,
                                 max_position_embeddings=max(256, args.max_length))
        backends = list(dict.fromkeys(["auto", *args.backends.split(","), "reference"]))
        for backend in backends:
            results[backend] = run(model_dir, backend, args, Path(tmp) / f"run_{backend}")
    ours, ref = results["auto"], results["reference"]
    print(f"\n# end-to-end Cal-DPO training, {args.device}: H={args.hidden} L={args.layers} V={args.vocab} "
          f"batch={args.batch_size} max_length={args.max_length}, median of {ours.get('steps_timed')} steps")
    print(f"{'head':<24}{'tokens/s':>12}{'step s':>10}{'peak GiB':>10}  step times s (warm-up included)")
    names = {"auto": "fused (backend=auto)", "reference": "materialised logits"}
    for backend in backends:
        name, r = names.get(backend, f"fused (backend={backend})"), results[backend]
        if "error" in r:
            print(f"{name:<24} failed: {r['error'][-300:]}")
        else:
            times = " ".join(f"{t:.3f}" for t in r["step_times_all"])
            print(f"{name:<24}{r['tokens_per_second']:>12.1f}{r['step_time']:>10.3f}{r['peak_memory_gb']:>10.2f}  "
                  f"{times}")
    if "error" not in ours and "error" not in ref:
        results["speedup"] = ours["tokens_per_second"] / ref["tokens_per_second"]
        print(f"fused / materialised throughput: {results['speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
