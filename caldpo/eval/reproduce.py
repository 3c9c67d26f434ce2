"""The paper's calibration claim on a laptop: ``python -m caldpo.eval.reproduce [--out DIR]``.

The claim (Cal-DPO paper, reward-dynamics figure): under DPO the reward of the chosen
responses falls below zero during training, under Cal-DPO it stays positive, and
Cal-DPO's policy is at least as good. Here it is tested on the synthetic task of
``caldpo.eval.synthetic`` (known ground-truth reward: high digits in a digit string;
Bradley-Terry preference pairs), with the tiny model, per seed:

1. write the task (seeded), SFT on its chosen responses;
2. from the SFT checkpoint, DPO and Cal-DPO (``loss=caldpo``) with the same beta,
   learning rate, optimizer, data order and steps;
3. sample ``--samples`` responses per test prompt from SFT, DPO and Cal-DPO (the same
   sampling seed for all three), score them with the ground-truth reward, and count
   wins of each policy against SFT on the same prompt and sample index.

It prints a table (eval rewards over training, final ground-truth reward and win rate
against SFT with 95% intervals, and a verdict per part of the claim), writes it to
``<out>/table.txt``, the numbers to ``<out>/report.json`` and the reward-dynamics plot
of every preference run to ``<out>/reward_dynamics.png``. Whatever the numbers show is
the verdict printed; nothing is tuned per loss. Each stage is an ordinary
``caldpo.train`` run (in this process); their logs go to ``<out>/logs/``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

from . import synthetic
from .stats import mean_ci, win_rate

LOSSES = ("dpo", "caldpo")
MODEL = ["model=tiny", "datasets=[sample]", "max_length=40", "max_prompt_length=32", "device=cpu",
         "optimizer=AdamW", "warmup_steps=5", "batch_size=16", "eval_batch_size=64", "export_hf=true",
         "kernels.backend=torch"]
SFT = ["loss=sft", "lr=1e-3"]
PREFERENCE = ["loss.beta=0.1", "lr=2e-4"]


def _train(overrides: list[str], log_file: Path) -> dict:
    """One ``caldpo.train`` run in this process, its printed output and log lines sent to ``log_file``."""
    from caldpo.train.trainer import main as train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    with open(log_file, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        streams = [h.setStream(f) for h in handlers]
        try:
            return train(overrides)
        finally:
            for h, s in zip(handlers, streams):
                h.setStream(s)


def _test_prompts(data_dir: Path) -> list[str]:
    """Distinct prompts of the task's test split, in file order."""
    seen: dict[str, None] = {}
    for line in (data_dir / "test.jsonl").read_text(encoding="utf-8").splitlines():
        chosen = json.loads(line)["chosen"]
        seen.setdefault(chosen[: chosen.rindex("\n\nAssistant:") + len("\n\nAssistant:")], None)
    return list(seen)


def sample(model_dir: Path, prompts: list[str], n: int, seed: int, max_new_tokens: int,
           policy_pt: Path | None = None) -> list[list[str]]:
    """``n`` responses per prompt (temperature 1) from a Hugging Face export (weights replaced by
    ``policy_pt``'s state when given); the same seed, the same random draws."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from caldpo.hf import from_pretrained

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = from_pretrained(AutoModelForCausalLM, model_dir).eval()
    if policy_pt is not None:
        lm.load_state_dict(torch.load(policy_pt, map_location="cpu", weights_only=True)["state"])
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(t)) + t for t in ids])
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in ids])
    torch.manual_seed(seed)
    with torch.no_grad():
        gen = lm.generate(input_ids=input_ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                          do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                          pad_token_id=pad, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def _mean(rows: list[list[float]]) -> float:
    flat = [x for row in rows for x in row]
    return sum(flat) / len(flat)


def _eval_curve(run_dir: Path) -> list[dict]:
    by_ex = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("split") == "eval" and "rewards/chosen" in r:
            by_ex[r["examples"]] = {k: r[k] for k in ("examples", "rewards/chosen", "rewards/rejected",
                                                      "rewards/margins", "rewards/accuracies")}
    return [by_ex[k] for k in sorted(by_ex)]


def run_seed(seed: int, out: Path, a: argparse.Namespace) -> dict:
    """Task, SFT, DPO, Cal-DPO and ground-truth scoring for one seed."""
    root = out / f"seed{seed}"
    data = synthetic.write_task(root / "data", a.n_train, a.n_test, seed=1000 + seed)
    common = [*MODEL, f"data.paths.sample={data}", f"seed={seed}", f"n_eval_examples={a.n_test}"]
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t = time.time()
    _train([*common, *SFT, f"n_epochs={a.sft_epochs}", "eval_every=1000000", f"run_dir={root / 'sft'}"],
           logs / f"seed{seed}_sft.log")
    archive = root / "sft" / "LATEST" / "policy.pt"
    every = max(16, a.n_train * a.epochs // a.n_evals // 16 * 16)
    for loss in LOSSES:
        _train([*common, f"loss={loss}", *PREFERENCE, f"n_epochs={a.epochs}", f"eval_every={every}",
                f"model.archive={archive}", f"run_dir={root / loss}"], logs / f"seed{seed}_{loss}.log")
    prompts = _test_prompts(data)[: a.prompts]
    gen = dict(n=a.samples, seed=10_000 + seed, max_new_tokens=synthetic.LENGTH + 2)
    rewards = {}
    for name in ("sft", *LOSSES):
        texts = sample(root / name / "LATEST" / "hf", prompts, **gen)
        rewards[name] = [[synthetic.reward(x) for x in row] for row in texts]
        if name != "sft":
            (root / name / "ground_truth_samples.json").write_text(json.dumps(
                [{"prompt": p, "responses": r} for p, r in zip(prompts, texts)], indent=1))
    curves = {loss: _eval_curve(root / loss) for loss in LOSSES}
    sft_gt = _mean(rewards["sft"])
    for loss in LOSSES:  # the ground truth at every evaluation: the step-<examples>/policy.pt exports
        for point in curves[loss]:
            ckpt = root / loss / f"step-{point['examples']}" / "policy.pt"
            if point["examples"] == 0:
                point["gt_reward"] = sft_gt
            elif point is curves[loss][-1]:
                point["gt_reward"] = _mean(rewards[loss])
            elif ckpt.is_file():
                texts = sample(root / loss / "LATEST" / "hf", prompts, policy_pt=ckpt, **gen)
                point["gt_reward"] = _mean([[synthetic.reward(x) for x in row] for row in texts])
    result = {"seed": seed, "seconds": time.time() - t, "rewards": rewards, "curves": curves}
    print(f"  seed {seed}: {result['seconds']:.0f} s; mean ground-truth reward " +
          ", ".join(f"{k} {sum(map(sum, v)) / sum(map(len, v)):.2f}" for k, v in rewards.items()), flush=True)
    return result


def _fmt_ci(m: float, lo: float, hi: float, p: int = 2) -> str:
    return f"{m:+.{p}f} [{lo:+.{p}f}, {hi:+.{p}f}]" if not math.isnan(lo) else f"{m:+.{p}f}"


def summarise(results: list[dict], header: str) -> tuple[str, dict]:
    """The printed table and its numbers."""
    lines = [header, ""]
    summary: dict = {"losses": {}}
    lines.append("Eval rewards (beta*h, on the test pairs) and the ground-truth (GT) reward of samples over training,"
                 " mean over seeds [min, max]:")
    lines.append(f"  {'loss':<8}{'examples':>9}  {'chosen reward':<28}{'rejected reward':<28}{'accuracy':>8}"
                 f"  {'GT reward of samples':<22}")
    for loss in LOSSES:
        curves = [r["curves"][loss] for r in results]
        for i, point in enumerate(curves[0]):
            vals = {k: [c[i][k] for c in curves if i < len(c)] for k in ("rewards/chosen", "rewards/rejected",
                                                                          "rewards/accuracies")}
            cell = {k: f"{sum(v) / len(v):+.3f} [{min(v):+.3f}, {max(v):+.3f}]" for k, v in vals.items()}
            acc = vals["rewards/accuracies"]
            gt = [c[i]["gt_reward"] for c in curves if i < len(c) and "gt_reward" in c[i]]
            gt_cell = f"{sum(gt) / len(gt):.2f} [{min(gt):.2f}, {max(gt):.2f}]" if gt else "-"
            lines.append(f"  {loss:<8}{point['examples']:>9}  {cell['rewards/chosen']:<28}"
                         f"{cell['rewards/rejected']:<28}{sum(acc) / len(acc):>8.3f}  {gt_cell:<22}")
    lines += ["", "Final policies, judged by the ground-truth reward (0-%d high digits), pooled over seeds:"
              % synthetic.LENGTH,
              f"  {'policy':<8}{'GT reward, 95% CI':<26}{'per seed':<22}{'win rate vs SFT, 95% Wilson':<30}"
              f"{'W/T/L':<14}"]
    for name in ("sft", *LOSSES):
        flat = [x for r in results for row in r["rewards"][name] for x in row]
        m, lo, hi = mean_ci(flat)
        per_seed = " ".join(f"{_mean(r['rewards'][name]):.2f}" for r in results)
        entry = {"gt_reward": m, "gt_ci": [lo, hi], "gt_per_seed": [float(x) for x in per_seed.split()]}
        wr = ""
        wtl = ""
        if name != "sft":
            w = t_ = l_ = 0
            for r in results:
                for a_row, b_row in zip(r["rewards"][name], r["rewards"]["sft"]):
                    for x, y in zip(a_row, b_row):
                        w, t_, l_ = w + (x > y), t_ + (x == y), l_ + (x < y)
            stats = win_rate(w, t_, l_)
            entry.update(wins=w, ties=t_, losses=l_, **stats)
            wr = f"{stats['win_rate']:.3f} [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"
            wtl = f"{w}/{t_}/{l_}"
        summary["losses"][name] = entry
        lines.append(f"  {name:<8}{_fmt_ci(m, lo, hi):<26}{per_seed:<22}{wr:<30}{wtl:<14}")
    lines.append("  (win rate: ties count half; each policy sample is compared with the SFT sample drawn for the same"
                 " prompt and index)")

    n = len(results)
    final = {loss: [r["curves"][loss][-1]["rewards/chosen"] for r in results] for loss in LOSSES}
    dpo_neg = sum(x < 0 for x in final["dpo"])
    cal_pos = sum(all(p["rewards/chosen"] > 0 for p in r["curves"]["caldpo"][1:]) for r in results)
    diffs = [x - y for r in results for ra, rb in zip(r["rewards"]["caldpo"], r["rewards"]["dpo"])
             for x, y in zip(ra, rb)]
    d, dlo, dhi = mean_ci(diffs)
    per_seed = {loss: [_mean(r["rewards"][loss]) for r in results] for loss in LOSSES}
    cal_ge = sum(c >= x for c, x in zip(per_seed["caldpo"], per_seed["dpo"]))
    if dlo > 0:
        third = "holds: Cal-DPO higher (interval above 0)"
    elif dhi < 0:
        third = "does NOT hold: DPO higher (interval below 0)"
    else:
        third = "holds: no significant difference (interval contains 0)"
    verdicts = {
        "dpo_chosen_below_zero": f"{dpo_neg}/{n} seeds",
        "caldpo_chosen_stays_positive": f"{cal_pos}/{n} seeds",
        "caldpo_minus_dpo_gt_reward": [d, dlo, dhi],
        "caldpo_at_least_dpo_seeds": f"{cal_ge}/{n} seeds",
    }
    lines += ["", "The claim, part by part:",
              f"  1. DPO: final eval chosen reward below zero in {dpo_neg}/{n} seeds "
              f"({', '.join(f'{x:+.3f}' for x in final['dpo'])}) -> "
              + ("holds" if dpo_neg == n else "does NOT hold" if dpo_neg == 0 else "holds in some seeds only"),
              f"  2. Cal-DPO: eval chosen reward positive at every evaluation after the first in {cal_pos}/{n} seeds "
              f"(final {', '.join(f'{x:+.3f}' for x in final['caldpo'])}) -> "
              + ("holds" if cal_pos == n else "does NOT hold" if cal_pos == 0 else "holds in some seeds only"),
              f"  3. Cal-DPO at least as good in ground-truth reward: Cal-DPO - DPO = {_fmt_ci(d, dlo, dhi, 3)} "
              f"(paired by prompt and sample index) -> {third}",
              f"     per seed: Cal-DPO >= DPO in {cal_ge}/{n} seeds; the interval is over samples, and the seeds "
              f"vary more: DPO {min(per_seed['dpo']):.2f}..{max(per_seed['dpo']):.2f}, "
              f"Cal-DPO {min(per_seed['caldpo']):.2f}..{max(per_seed['caldpo']):.2f}"]
    summary["verdicts"] = verdicts
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m caldpo.eval.reproduce", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: runs/reproduce_<time>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=2048, help="preference pairs (and SFT prompts) per seed")
    p.add_argument("--n-test", type=int, default=128, help="test pairs (eval metrics) per seed")
    p.add_argument("--sft-epochs", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1, help="DPO / Cal-DPO epochs")
    p.add_argument("--n-evals", type=int, default=4, help="evaluations during preference training")
    p.add_argument("--prompts", type=int, default=64, help="test prompts sampled for the ground-truth judge")
    p.add_argument("--samples", type=int, default=8, help="samples per test prompt")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the tiny model gains nothing from more)")
    a = p.parse_args(argv)
    out = Path(a.out or f"runs/reproduce_{time.strftime('%Y%m%d_%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(a.threads)
    t0, cpu0 = time.time(), time.process_time()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    print(f"caldpo reproduce: seeds {a.seeds}, {a.n_train} pairs, {a.epochs} epoch(s), out {out}", flush=True)
    results = [run_seed(s, out, a) for s in a.seeds]
    seconds = time.time() - t0
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    cpu = time.process_time() - cpu0
    header = (f"Cal-DPO vs DPO on the synthetic ground-truth task (caldpo.eval.synthetic): tiny model, "
              f"{len(a.seeds)} seed(s), {a.n_train} pairs, SFT {a.sft_epochs} epoch(s) then {a.epochs} epoch(s) of "
              f"each loss at beta=0.1, lr=2e-4, AdamW, batch 16.\n"
              f"Machine: {platform.node()} {platform.machine()}, {torch.get_num_threads()} torch threads, "
              f"{os.cpu_count()} CPUs; load average {load0:.2f} -> {load1:.2f}; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall time {seconds:.0f} s, "
              f"CPU time of this process {cpu:.0f} s.")
    table, summary = summarise(results, header)
    from caldpo.plot import plot_runs
    runs = [out / f"seed{s}" / loss for s in a.seeds for loss in LOSSES]
    plot = plot_runs(runs, out / "reward_dynamics.png", labels=[f"{loss} seed {s}" for s in a.seeds for loss in LOSSES],
                     title="reward dynamics on the synthetic task: DPO vs Cal-DPO (beta=0.1)")
    table += f"\n\nPlot: {plot}"
    print("\n" + table, flush=True)
    (out / "table.txt").write_text(table + "\n")
    report = {"args": vars(a), "seconds": seconds, "cpu_seconds": cpu, "summary": summary, "results": results, "plot": str(plot)}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    return report


if __name__ == "__main__":
    from caldpo.cli import main as _main

    def _work() -> None:
        main()

    _main(_work)
