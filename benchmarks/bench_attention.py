"""Backbone forward + backward per layout and attention path, and the varlen kernel against its emulation.

One micro-batch of preference pairs with HH-like lengths (token ids drawn directly: prompts
log-normal around 120 tokens, responses around 60, every pair within ``--max-length``, some
responses beginning alike) runs through the same GPT-NeoX backbone (Pythia-shaped: rotary 0.25,
parallel residual; random weights) loaded with caldpo's attention (``caldpo.train.attention.NAME``),
forward and backward from the hidden states the head would score, four ways:

* ``padded/mask``: two right-padded rows per pair with their attention mask (what padded ran
  before: a 4D mask, so SDPA cannot take its flash kernel);
* ``padded/no-mask``: the same rows without a mask (``attention.full_mask``: causal SDPA, flash-eligible);
* ``prefix_shared/mask``: one ``shared | chosen | rejected`` segment per pair, rows of the longest
  segment, a dense 4D boolean mask (``layout.PackedBatch.attention_mask``);
* ``prefix_shared/segments``: the same pairs in one row as attention segments: the varlen kernel on
  CUDA (bf16/fp16), its per-segment SDPA emulation on CPU.

Timings are interleaved (A B C D, D C B A, ...), reported as medians, each with its ratio to
``padded/mask``; the hidden states the head would score are compared across paths (relative
error against ``padded/mask``). On CUDA ``--check-kernel`` first compares the varlen kernel with
the emulation on the same segments at head dims 64, 80 and 128 in bf16 and fp16 (outputs and
gradients, relative error < 2e-2).

    python benchmarks/bench_attention.py                          # CPU: H 256, 4 layers, 4 heads, fp32
    python benchmarks/bench_attention.py --device cuda --check-kernel    # H 2560, 32 heads (Pythia-2.8B width), 4 layers, bf16
    python benchmarks/bench_attention.py --quick                  # tiny, 1 rep (the test)
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COLUMNS = ("padded/mask", "padded/no-mask", "prefix_shared/mask", "prefix_shared/segments")


def synthesize_pairs(n: int, max_length: int, vocab: int, seed: int = 0) -> list[dict]:
    """Tokenized pairs (``{chosen,rejected}_{input_ids,attention_mask,labels}``, lists) with HH-like
    lengths: prompt ~ lognormal(median 120, sigma 0.8), responses ~ lognormal(median 60 / 50, 0.9),
    each response ending in EOS (id 0), one pair in four with responses sharing 1-3 first tokens."""
    rng = random.Random(seed)

    def draw(median, sigma, lo, hi):
        return max(lo, min(hi, int(rng.lognormvariate(math.log(median), sigma))))

    def ids(k):
        return [rng.randrange(1, vocab) for _ in range(k)]

    out = []
    for _ in range(n):
        p = draw(120, 0.8, 4, max_length // 2)
        common = ids(rng.randint(1, 3)) if rng.random() < 0.25 else []
        ex = {}
        for side, median in (("chosen", 60), ("rejected", 50)):
            r = draw(median, 0.9, 1, max_length - p - len(common) - 1)
            resp = common + ids(r) + [0]
            prompt = out[-1]["_prompt"] if side == "rejected" else ids(p)
            ex["_prompt"] = prompt
            ex[f"{side}_input_ids"] = prompt + resp
            ex[f"{side}_attention_mask"] = [1] * (len(prompt) + len(resp))
            ex[f"{side}_labels"] = [-100] * len(prompt) + resp
            if side == "chosen":
                out.append(ex)
    for ex in out:
        del ex["_prompt"]
    return out


def build_model(args, device, dtype):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from caldpo.train.attention import register
    from caldpo.train.model import LogProbModel
    cfg = GPTNeoXConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden, rotary_pct=0.25,
                        use_parallel_residual=True, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        lm = GPTNeoXForCausalLM._from_config(cfg, attn_implementation=register(), dtype=dtype)
    return LogProbModel(lm.eval(), "torch")


def make_runs(model, examples, device):
    """column -> (backbone inputs, scored row index, each scored row's sequence), and the shapes."""
    import torch

    from caldpo.train.batches import collate
    from caldpo.train.layout import pack
    from caldpo.train.losses import padded_inputs
    batch = collate(examples, 0)
    pad = padded_inputs(batch, device)
    T = pad["input_ids"].shape[1]
    mask = torch.cat([torch.nn.functional.pad(batch[f"{s}_attention_mask"], (0, T - batch[f"{s}_attention_mask"].shape[1]))
                      for s in ("chosen", "rejected")]).to(device)
    dense = pack(examples, "prefix_shared", sft=False, pad_token_id=0).to(device)
    seg = pack(examples, "prefix_shared", sft=False, pad_token_id=0, segments=True).to(device)
    pad_seq = pad["kept"] // T  # padded row b is sequence b (chosen 0..P-1, then rejected), as in the packed head
    return {
        "padded/mask": (dict(input_ids=pad["input_ids"], attention_mask=mask), pad["kept"], pad_seq),
        "padded/no-mask": (dict(input_ids=pad["input_ids"], attention_mask=None), pad["kept"], pad_seq),
        "prefix_shared/mask": (dict(packed=dense), dense.rows, dense.sequence),
        "prefix_shared/segments": (dict(packed=seg), seg.rows, seg.sequence),
    }, {"padded_tokens": pad["input_ids"].numel(), "dense_rows": list(dense.input_ids.shape),
        "segment_tokens": seg.input_ids.numel(), "scored": int(pad["kept"].numel())}


def fwd_bwd(model, inputs, rows, probe):
    """Backbone forward, the scored rows' hidden states, a fixed projection's backward; returns those rows."""
    h = model.backbone(**inputs)
    sel = h.reshape(-1, h.shape[-1]).index_select(0, rows)
    (sel.float() * probe[: sel.shape[0]]).sum().backward()
    return sel.detach()


def check_kernel(args, device, examples) -> list[dict]:
    """The varlen kernel against the emulation on the segments of ``examples`` (random q, k, v)."""
    import torch

    from caldpo.train import attention as att
    from caldpo.train.layout import pack
    why = att.varlen_unavailable(device)
    if why:
        return [{"status": "skipped", "reason": why}]
    seg = pack(examples, "prefix_shared", sft=False, pad_token_id=0, segments=True).segments().to(device)
    n, out = seg.total_q, []
    for head_dim in (64, 80, 128):
        for dtype in (torch.bfloat16, torch.float16):
            g = torch.Generator(device=device).manual_seed(head_dim)
            base = [torch.randn(1, 4, n, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3)]
            grad = torch.randn(1, n, 4, head_dim, generator=g, device=device, dtype=dtype)
            res = {}
            for kernel in ("varlen", "emulate"):
                q, k, v = (t.clone().requires_grad_() for t in base)
                o = att.segment_attention(q, k, v, seg, head_dim ** -0.5, kernel=kernel)
                o.backward(grad)
                res[kernel] = [o.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
            errs = {name: float((a - b).abs().max() / b.abs().max())
                    for name, a, b in zip(("out", "dq", "dk", "dv"), res["varlen"], res["emulate"])}
            finite = all(bool(torch.isfinite(t).all()) for t in res["varlen"])
            ok = finite and max(errs.values()) < 2e-2
            out.append({"head_dim": head_dim, "dtype": str(dtype).split(".")[-1], "errors": errs, "finite": finite,
                        "status": "ok" if ok else "FAILED"})
            print(f"varlen vs emulation d={head_dim} {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
                  + ("" if ok else "  FAILED"), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=None, help="cpu: 256; cuda: 2560 (Pythia-2.8B)")
    p.add_argument("--heads", type=int, default=None, help="cpu: 4; cuda: 32 (head dim 80)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--dtype", default=None, help="cpu: float32; cuda: bfloat16")
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds (each column once per round)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting rounds after this many seconds")
    p.add_argument("--check-kernel", action="store_true", help="CUDA: varlen kernel vs emulation at head dims 64/80/128")
    p.add_argument("--quick", action="store_true", help="tiny shape, 1 round (plumbing check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    args = p.parse_args(argv)
    t_start = time.monotonic()
    import torch
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.quick:
        args.hidden, args.heads, args.layers, args.vocab, args.pairs, args.max_length, args.reps = 32, 2, 1, 128, 2, 64, 1
    args.hidden = args.hidden or (2560 if cuda else 256)
    args.heads = args.heads or (32 if cuda else 4)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    examples = synthesize_pairs(args.pairs, args.max_length, args.vocab, args.seed)
    report = {"command": "python benchmarks/bench_attention.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "settings": {k: getattr(args, k) for k in ("hidden", "heads", "layers", "vocab", "pairs", "max_length",
                                                         "reps", "seed")},
              "dtype": str(dtype).split(".")[-1], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    from caldpo.train.attention import varlen_signature
    report["varlen_signature"] = varlen_signature()
    if args.check_kernel and cuda:
        report["kernel_check"] = check_kernel(args, device, examples)
    model = build_model(args, device, dtype)
    runs, shapes = make_runs(model, examples, device)
    report["shapes"] = shapes
    probe = torch.randn(max(r.numel() for _, r, _ in runs.values()), args.hidden, device=device,
                        generator=torch.Generator(device=device).manual_seed(1))
    times: dict[str, list[float]] = {c: [] for c in COLUMNS}
    outputs = {}
    for c in COLUMNS:  # warm-up (and the outputs compared)
        model.zero_grad(set_to_none=True)
        outputs[c] = fwd_bwd(model, runs[c][0], runs[c][1], probe)
    for r in range(args.reps):
        if args.budget_s and time.monotonic() - t_start > args.budget_s and r > 0:
            break
        for c in (COLUMNS if r % 2 == 0 else COLUMNS[::-1]):
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            fwd_bwd(model, runs[c][0], runs[c][1], probe)
            if cuda:
                torch.cuda.synchronize(device)
            times[c].append(time.perf_counter() - t)
    base = statistics.median(times["padded/mask"])
    # Scored rows come in another order per layout: compare each sequence's sum of its scored hidden
    # states [S, H] (fp32), relative to padded/mask.
    n_seq = 2 * args.pairs

    def per_sequence(c):
        o, seq = outputs[c].float(), runs[c][2]
        return torch.zeros(n_seq, o.shape[1], device=o.device).index_add_(0, seq, o)

    ref = per_sequence("padded/mask")
    results = {}
    for c in COLUMNS:
        o = per_sequence(c)
        results[c] = {"median_s": statistics.median(times[c]), "times_s": times[c],
                      "speedup_vs_padded_mask": base / statistics.median(times[c]),
                      "hidden_rel_err_vs_padded_mask": float((o - ref).abs().max() / ref.abs().max()),
                      "finite": bool(torch.isfinite(outputs[c]).all())}
    report["results"] = results
    report["seconds"] = time.monotonic() - t_start
    md = table(report)
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    bad = [c for c, r in results.items() if not r["finite"]] + [
        f"kernel d={k['head_dim']} {k['dtype']}" for k in report.get("kernel_check", []) if k.get("status") == "FAILED"]
    if bad:
        raise SystemExit(f"bench_attention: failed: {', '.join(bad)}")
    return report


def table(report: dict) -> str:
    st, sh = report["settings"], report["shapes"]
    lines = [f"# Backbone forward + backward per attention path, {report['device']}, {report['date']}", "",
             f"`{report['command']}`", "",
             f"GPT-NeoX H {st['hidden']}, {st['heads']} heads (head dim {st['hidden'] // st['heads']}), {st['layers']} "
             f"layers, {report['dtype']}, torch {report['torch']} ({report['threads']} threads); {st['pairs']} pairs, "
             f"{sh['scored']} scored tokens; padded rows {sh['padded_tokens']} tokens, dense-mask rows "
             f"{sh['dense_rows']}, one segment row {sh['segment_tokens']} tokens. Medians of {st['reps']} interleaved "
             "rounds.", "",
             "| path | median (ms) | vs padded/mask | per-sequence hidden sums, rel. err vs padded/mask |",
             "|---|---:|---:|---:|"]
    for c, r in report["results"].items():
        lines.append(f"| {c} | {r['median_s'] * 1e3:.1f} | {r['speedup_vs_padded_mask']:.2f}x | "
                     f"{r['hidden_rel_err_vs_padded_mask']:.1e} |")
    if report.get("kernel_check"):
        lines += ["", "varlen kernel vs emulation (max relative error):"]
        for k in report["kernel_check"]:
            if k.get("status") == "skipped":
                lines.append(f"- skipped: {k['reason']}")
            else:
                lines.append(f"- head dim {k['head_dim']} {k['dtype']}: "
                             + ", ".join(f"{n} {e:.1e}" for n, e in k["errors"].items()) + f" ({k['status']})")
    lines.append(f"\nvarlen_attn signature: {report['varlen_signature']}; {report['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
