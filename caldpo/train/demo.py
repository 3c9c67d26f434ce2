"""The embedded default: SFT, then Cal-DPO from the SFT checkpoint, generation, a judged win rate, a plot.

``python -m caldpo.train.demo [--root DIR]`` runs the whole pipeline on the HH-format
sample shipped with caldpo, with the tiny Pythia-shaped model built locally (no
download), in a few minutes on two CPU cores. Each stage is an ordinary
``caldpo.train`` run; the overrides below are the whole recipe. Last, the samples are
judged against the dataset's chosen responses by ``caldpo.eval`` with the local-LM judge
(the SFT policy's Hugging Face export, the only LM at hand offline: a pipeline check, not
a quality measure), and ``caldpo.plot`` draws both runs' reward dynamics.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

COMMON = ["model=tiny", "datasets=[sample]", "max_length=96", "max_prompt_length=48", "device=cpu",
          "optimizer=AdamW", "warmup_steps=5", "batch_size=16", "eval_batch_size=32", "n_eval_examples=64",
          "eval_every=200"]
SFT = ["loss=sft", "lr=1e-3", "n_epochs=4"]
CALDPO = ["loss=caldpo", "loss.beta=0.1", "lr=2e-4", "n_epochs=2"]
GENERATE = ["generate.n_prompts=16", "max_new_tokens=40"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="where the runs go (default: runs/demo_<time>)")
    args = parser.parse_args(argv)
    from . import generate, main as train

    root = Path(args.root or f"runs/demo_{time.strftime('%Y%m%d_%H%M%S')}").resolve()
    t0 = time.time()
    print(f"[1/4] SFT on the shipped sample -> {root / 'sft'}", flush=True)
    sft = train([*COMMON, *SFT, f"run_dir={root / 'sft'}"])
    archive = root / "sft" / "LATEST" / "policy.pt"
    print(f"\n[2/4] Cal-DPO from {archive} -> {root / 'caldpo'}", flush=True)
    cal = train([*COMMON, *CALDPO, f"model.archive={archive}", f"run_dir={root / 'caldpo'}"])
    print("\n[3/4] Sampling test-prompt completions from the Cal-DPO policy", flush=True)
    samples = generate.main([*COMMON, *GENERATE, f"model.archive={root / 'caldpo' / 'LATEST' / 'policy.pt'}"])
    print("\n[4/4] Judging the samples against the chosen responses (local-LM judge), plotting", flush=True)
    from caldpo.eval.__main__ import main as judge
    report = judge([str(samples), "--judge", "lm", "--judge-lm", str(root / "sft" / "LATEST" / "hf"),
                    "--out", str(root / "caldpo" / "samples.lm.eval.json")])
    from caldpo.plot import plot_runs
    plot = plot_runs([root / "sft", root / "caldpo"], root / "reward_dynamics.png")
    first, last = cal["eval_first"], cal["eval_last"]
    print(f"\n== caldpo demo finished in {time.time() - t0:.0f} s; runs in {root}")
    print(f"   SFT eval NLL of chosen responses: {sft['eval_first']['loss']:.2f} -> {sft['eval_last']['loss']:.2f}")
    print("   Cal-DPO eval metrics (before -> after):")
    for k in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        print(f"     {k:<20} {first[k]:+.4f} -> {last[k]:+.4f}")
    example = json.loads(Path(samples).read_text())[0]
    print(f"   samples: {samples}\n   e.g. prompt ...{example['prompt'][-60:]!r}\n        response {example['response'][:80]!r}")
    w = report["summary"]
    print(f"   win rate vs chosen (local-LM judge): {w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] "
          f"({w['wins']}/{w['ties']}/{w['losses']} W/T/L, {w['unparsable']} unparsable)")
    print(f"   what it means: {win_rate_meaning(w)}")
    print(f"   reward dynamics plot: {plot}")
    return {"root": str(root), "sft": sft, "caldpo": cal, "samples": str(samples), "eval": report["summary"],
            "plot": str(plot)}


def win_rate_meaning(summary: dict) -> str:
    """One line on what the demo's win rate measures: the judge is the tiny SFT model itself (no capable judge
    is at hand offline), so it checks the pipeline, not quality; and when the position-bias test says the
    judge followed position (``caldpo.eval.stats.position_bias``), that the number measures the order shown."""
    n = summary["wins"] + summary["ties"] + summary["losses"]
    line = (f"how often, over {n} judged test prompts, the tiny SFT model itself (the only LM at hand offline, not a "
            "capable judge) preferred the Cal-DPO response to the dataset's chosen one; a check that the "
            "pipeline runs, not a measure of quality")
    if summary.get("follows_position"):
        line += ("; and here the judge followed position (the WARNING above: p = "
                 f"{summary['position_p_value']:.2g}), so the number reflects the order shown, not the responses")
    return line


if __name__ == "__main__":
    main()
