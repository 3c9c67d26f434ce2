"""The paper's calibration claim on a laptop: ``python -m caldpo.eval.reproduce [--out DIR]``.

The claim (Cal-DPO paper, reward-dynamics figure): under DPO the reward of the chosen
responses falls below zero during training, under Cal-DPO it stays positive, and
Cal-DPO's policy is at least as good. Here it is tested on the synthetic task of
``caldpo.eval.synthetic``: a known ground-truth reward (high digits in a digit string) and,
as in the paper's setting, off-policy pairs: the SFT reference is fit to uniform digit strings,
the preference pairs (Bradley-Terry on the ground truth) are written by a teacher that writes
only even digits, on other prompts. Per seed, with the tiny model:

1. write the task (seeded); check that no sequence is truncated (every response keeps its
   EOS at ``max_length``; the run stops otherwise); SFT on the SFT split;
2. from the SFT checkpoint, for each beta of ``--betas``: DPO and Cal-DPO (``loss=caldpo``)
   with the same learning rate, optimizer, data order and steps;
3. sample ``--samples`` responses per held-out pair prompt from SFT and every preference
   policy (the same sampling seed for all), score them with the ground-truth reward, check
   their format (``synthetic.in_format``), and count wins of each policy against SFT on the
   same prompt and sample index.

The claim is judged per beta on late-training means (the evaluations, and the train batches,
of the second half of training), never on a single last point: (1) DPO's eval chosen reward
below zero, (2) Cal-DPO's above zero (and whether it stayed positive at every evaluation),
(3) Cal-DPO's ground truth at least DPO's (paired interval), next to each policy's format
validity. It prints the tables, writes them to ``<out>/table.txt``, the numbers to
``<out>/report.json`` and the reward-dynamics plot of the ``--plot-beta`` runs to
``<out>/reward_dynamics.png``. Whatever the numbers show is the verdict printed; nothing is
tuned per loss. Each stage is an ordinary ``caldpo.train`` run (in this process); their logs
go to ``<out>/logs/``. ``table.txt`` is the header (machine, time) and the body; the body is a
function of ``report.json``'s results alone (``summarise``), and the same command on the same
machine prints the same body.
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
MAX_LENGTH, MAX_PROMPT_LENGTH = 64, 48  # prompts are at most 38 tiny-model tokens, responses 8 + EOS
MODEL = ["model=tiny", "datasets=[sample]", f"max_length={MAX_LENGTH}", f"max_prompt_length={MAX_PROMPT_LENGTH}",
         "device=cpu", "optimizer=AdamW", "warmup_steps=5", "batch_size=16", "eval_batch_size=64", "export_hf=true",
         "export_at_eval=false", "kernels.backend=torch"]
SFT = ["loss=sft", "lr=1e-3"]
PREFERENCE_LR = 2e-4


class TruncationError(RuntimeError):
    """A sequence of the task would be cut at ``max_length``: the run would not train the task."""


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
    """Distinct prompts of the task's held-out preference pairs, in file order."""
    seen: dict[str, None] = {}
    for line in (data_dir / "pref" / "test.jsonl").read_text(encoding="utf-8").splitlines():
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


def truncation(data_dir: Path) -> dict:
    """Tokenize every split of the task as training does (``batches.tokenize_dataset``, the tiny tokenizer,
    ``MAX_LENGTH`` / ``MAX_PROMPT_LENGTH``) -> counts of responses, prompts and responses cut, and responses
    whose last token is EOS. Raises TruncationError when anything is cut or an EOS is lost."""
    from transformers import AutoTokenizer

    from caldpo.train.batches import flatten, tokenize_dataset
    from caldpo.train.data import load_dataset
    from caldpo.train.tiny import tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    counts = {"responses": 0, "with_eos": 0, "prompts_cut": 0, "responses_cut": 0}
    for part in ("sft", "pref"):
        for split in ("train", "test"):
            groups, _ = load_dataset("sample", split, sft=part == "sft", path=str(data_dir / part))
            items, report = tokenize_dataset(flatten(groups, sft=part == "sft"), tok, max_length=MAX_LENGTH,
                                             max_prompt_length=MAX_PROMPT_LENGTH)
            counts["prompts_cut"] += report.prompts_cut
            counts["responses_cut"] += report.responses_cut
            for ex in items:
                for ids in (ex.tokens.chosen, ex.tokens.rejected):
                    if ids is not None:
                        counts["responses"] += 1
                        counts["with_eos"] += int(ids[-1]) == tok.eos_token_id
    if counts["prompts_cut"] or counts["responses_cut"] or counts["with_eos"] != counts["responses"]:
        raise TruncationError(f"max_length={MAX_LENGTH}, max_prompt_length={MAX_PROMPT_LENGTH} cut the task: {counts}")
    return counts


def _records(run_dir: Path, split: str) -> list[dict]:
    keys = ("examples", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "rewards/chosen_positive")
    by_ex = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("split") == split and "rewards/chosen" in r:
            by_ex[r["examples"]] = {k: r[k] for k in keys}
    return [by_ex[k] for k in sorted(by_ex)]


def _policy_samples(texts: list[list[str]]) -> dict:
    return {"rewards": [[synthetic.reward(x) for x in row] for row in texts],
            "in_format": [[synthetic.in_format(x) for x in row] for row in texts],
            "even": [[synthetic.even_fraction(x) for x in row] for row in texts]}


def run_name(loss: str, beta: float) -> str:
    return f"{loss}_beta{beta:g}"


def run_seed(seed: int, out: Path, a: argparse.Namespace) -> dict:
    """Task, SFT, DPO and Cal-DPO at every beta, and ground-truth scoring for one seed."""
    root = out / f"seed{seed}"
    data = synthetic.write_task(root / "data", a.n_sft, a.n_train, a.n_test, seed=1000 + seed)
    trunc = truncation(data)
    common = [*MODEL, f"seed={seed}", f"n_eval_examples={a.n_test}"]
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t = time.time()
    _train([*common, f"data.paths.sample={data / 'sft'}", *SFT, f"n_epochs={a.sft_epochs}", "eval_every=1000000",
            f"run_dir={root / 'sft'}"], logs / f"seed{seed}_sft.log")
    archive = root / "sft" / "LATEST" / "policy.pt"
    every = max(16, a.n_train * a.epochs // a.n_evals // 16 * 16)
    runs = [(loss, beta) for beta in a.betas for loss in LOSSES]
    for loss, beta in runs:
        name = run_name(loss, beta)
        _train([*common, f"data.paths.sample={data / 'pref'}", f"loss={loss}", f"loss.beta={beta}",
                f"lr={PREFERENCE_LR}", f"n_epochs={a.epochs}", f"eval_every={every}", f"model.archive={archive}",
                f"run_dir={root / name}"], logs / f"seed{seed}_{name}.log")
    prompts = _test_prompts(data)[: a.prompts]
    gen = dict(n=a.samples, seed=10_000 + seed, max_new_tokens=synthetic.LENGTH + 2)
    samples = {}
    for name in ("sft", *(run_name(loss, beta) for loss, beta in runs)):
        texts = sample(root / name / "LATEST" / "hf", prompts, **gen)
        samples[name] = _policy_samples(texts)
        (root / name / "ground_truth_samples.json").write_text(json.dumps(
            [{"prompt": p, "responses": r} for p, r in zip(prompts, texts)], indent=1))
    curves = {run_name(loss, beta): {"eval": _records(root / run_name(loss, beta), "eval"),
                                     "train": _records(root / run_name(loss, beta), "train")} for loss, beta in runs}
    result = {"seed": seed, "seconds": time.time() - t, "truncation": trunc, "samples": samples, "curves": curves}
    print(f"  seed {seed}: {result['seconds']:.0f} s; mean ground-truth reward " +
          ", ".join(f"{k} {_mean(v['rewards']):.2f}" for k, v in samples.items()), flush=True)
    return result


def late_mean(points: list[dict], key: str) -> float:
    """Mean of ``key`` over the points of the second half of training (examples > half the last point's)."""
    last = points[-1]["examples"]
    late = [p[key] for p in points if p["examples"] > last / 2]
    return sum(late) / len(late)


def _fmt_ci(m: float, lo: float, hi: float, p: int = 2) -> str:
    return f"{m:+.{p}f} [{lo:+.{p}f}, {hi:+.{p}f}]" if not math.isnan(lo) else f"{m:+.{p}f}"


def _spread(vals: list[float], p: int = 3, sign: str = "+") -> str:
    m = sum(vals) / len(vals)
    return f"{m:{sign}.{p}f} [{min(vals):{sign}.{p}f}, {max(vals):{sign}.{p}f}]"


def _verdict(k: int, n: int) -> str:
    return "holds" if k == n else "does NOT hold" if k == 0 else "holds in some seeds only"


def summarise(results: list[dict], betas: list[float]) -> tuple[str, dict]:
    """The printed tables (the body of table.txt) and their numbers, from the per-seed results alone."""
    n = len(results)
    lines: list[str] = []
    summary: dict = {"runs": {}, "verdicts": {}}
    t = results[0]["truncation"]
    lines += [f"Truncation (max_length {MAX_LENGTH}, max_prompt_length {MAX_PROMPT_LENGTH}), per seed: "
              f"{t['responses']} responses, " + ", ".join(
                  f"seed {r['seed']}: {r['truncation']['with_eos']}/{r['truncation']['responses']} keep their EOS, "
                  f"{r['truncation']['prompts_cut']} prompts and {r['truncation']['responses_cut']} responses cut"
                  for r in results), ""]
    lines.append("Rewards (beta*h), late-training mean (second half of training), mean over seeds [min, max]:")
    lines.append(f"  {'beta':<6}{'loss':<8}{'eval chosen':<28}{'eval rejected':<28}{'eval acc':>9}"
                 f"{'eval chosen>0':>14}  {'train chosen':<28}{'train chosen>0':>15}")
    for beta in betas:
        for loss in LOSSES:
            name = run_name(loss, beta)
            cur = [r["curves"][name] for r in results]
            cell = {k: [late_mean(c[split], key) for c in cur] for k, (split, key) in {
                "ec": ("eval", "rewards/chosen"), "er": ("eval", "rewards/rejected"),
                "ea": ("eval", "rewards/accuracies"), "ep": ("eval", "rewards/chosen_positive"),
                "tc": ("train", "rewards/chosen"), "tp": ("train", "rewards/chosen_positive")}.items()}
            summary["runs"][name] = {"late_" + k: v for k, v in cell.items()}
            lines.append(f"  {beta:<6g}{loss:<8}{_spread(cell['ec']):<28}{_spread(cell['er']):<28}"
                         f"{sum(cell['ea']) / n:>9.3f}{sum(cell['ep']) / n:>14.3f}  {_spread(cell['tc']):<28}"
                         f"{sum(cell['tp']) / n:>15.3f}")
    lines += ["", "Eval chosen reward at each evaluation (examples seen: reward), mean over seeds:"]
    for beta in betas:
        for loss in LOSSES:
            cur = [r["curves"][run_name(loss, beta)]["eval"] for r in results]
            pts = []
            for i, p in enumerate(cur[0]):
                vals = [c[i]["rewards/chosen"] for c in cur if i < len(c)]
                pts.append(f"{p['examples']}: {sum(vals) / len(vals):+.3f}")
            lines.append(f"  beta {beta:<6g}{loss:<8}" + ", ".join(pts))
    lines += ["", f"Samples from the final policies on held-out pair prompts, judged by the ground truth (0-"
              f"{synthetic.LENGTH} high digits); per seed: GT reward / in format / teacher's even digits:",
              f"  {'policy':<18}{'GT reward, pooled 95% CI':<26}{'win rate vs SFT, 95% Wilson':<30}{'W/T/L':<15}"
              "per seed (GT / in format / even)"]
    names = ["sft", *(run_name(loss, beta) for beta in betas for loss in LOSSES)]
    for name in names:
        flat = [x for r in results for row in r["samples"][name]["rewards"] for x in row]
        m, lo, hi = mean_ci(flat)
        per_seed = [(_mean(r["samples"][name]["rewards"]), _mean(r["samples"][name]["in_format"]),
                     _mean(r["samples"][name]["even"])) for r in results]
        entry = {"gt_reward": m, "gt_ci": [lo, hi], "per_seed": per_seed}
        wr = wtl = ""
        if name != "sft":
            pairs = [(x, y) for r in results for ra, rb in zip(r["samples"][name]["rewards"], r["samples"]["sft"]["rewards"])
                     for x, y in zip(ra, rb)]
            w, t_, l_ = sum(x > y for x, y in pairs), sum(x == y for x, y in pairs), sum(x < y for x, y in pairs)
            stats = win_rate(w, t_, l_)
            entry.update(wins=w, ties=t_, losses=l_, **stats)
            wr = f"{stats['win_rate']:.3f} [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"
            wtl = f"{w}/{t_}/{l_}"
        summary["runs"].setdefault(name, {}).update(entry)
        seeds = "  ".join(f"{g:.2f}/{f:.0%}/{e:.0%}" for g, f, e in per_seed)
        lines.append(f"  {name:<18}{_fmt_ci(m, lo, hi):<26}{wr:<30}{wtl:<15}{seeds}")
    lines.append("  (win rate: ties count half; each policy sample is compared with the SFT sample drawn for the same"
                 " prompt and index)")
    lines += ["", "The claim, part by part, on late-training means (second half of training):"]
    for beta in betas:
        dpo, cal = summary["runs"][run_name("dpo", beta)], summary["runs"][run_name("caldpo", beta)]
        dpo_neg = sum(x < 0 for x in dpo["late_ec"])
        cal_pos = sum(x > 0 for x in cal["late_ec"])
        cal_always = sum(all(p["rewards/chosen"] > 0 for p in r["curves"][run_name("caldpo", beta)]["eval"][1:])
                         for r in results)
        diffs = [x - y for r in results for ra, rb in zip(r["samples"][run_name("caldpo", beta)]["rewards"],
                                                            r["samples"][run_name("dpo", beta)]["rewards"])
                 for x, y in zip(ra, rb)]
        d, dlo, dhi = mean_ci(diffs)
        third = ("holds: Cal-DPO higher (interval above 0)" if dlo > 0 else
                 "does NOT hold: DPO higher (interval below 0)" if dhi < 0 else
                 "holds: no significant difference (interval contains 0)")
        fmt = {k: sum(f for _, f, _ in summary["runs"][run_name(k, beta)]["per_seed"]) / n for k in LOSSES}
        summary["verdicts"][f"beta{beta:g}"] = {
            "dpo_late_chosen_below_zero": f"{dpo_neg}/{n}", "caldpo_late_chosen_above_zero": f"{cal_pos}/{n}",
            "caldpo_positive_at_every_eval": f"{cal_always}/{n}", "caldpo_minus_dpo_gt_reward": [d, dlo, dhi],
            "in_format": fmt}
        lines += [f"  beta {beta:g}:",
                  f"    1. DPO: late eval chosen reward below zero in {dpo_neg}/{n} seeds "
                  f"({', '.join(f'{x:+.3f}' for x in dpo['late_ec'])}) -> {_verdict(dpo_neg, n)}",
                  f"    2. Cal-DPO: late eval chosen reward above zero in {cal_pos}/{n} seeds "
                  f"({', '.join(f'{x:+.3f}' for x in cal['late_ec'])}) -> {_verdict(cal_pos, n)}; "
                  f"positive at every evaluation after the first in {cal_always}/{n}",
                  f"    3. Cal-DPO at least as good in ground-truth reward: Cal-DPO - DPO = {_fmt_ci(d, dlo, dhi, 3)} "
                  f"(paired by prompt and sample index) -> {third}; samples in format: DPO {fmt['dpo']:.0%}, "
                  f"Cal-DPO {fmt['caldpo']:.0%}"]
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m caldpo.eval.reproduce", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: runs/reproduce_<time>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--n-sft", type=int, default=2048, help="SFT examples per seed (uniform digit strings)")
    p.add_argument("--n-train", type=int, default=2048, help="preference pairs per seed (the teacher's)")
    p.add_argument("--n-test", type=int, default=128, help="held-out pairs (eval metrics) per seed")
    p.add_argument("--sft-epochs", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1, help="DPO / Cal-DPO epochs")
    p.add_argument("--n-evals", type=int, default=4, help="evaluations during preference training")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts sampled for the ground-truth judge")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--plot-beta", type=float, default=0.1, help="beta whose runs are plotted")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the tiny model gains nothing from more)")
    a = p.parse_args(argv)
    out = Path(a.out or f"runs/reproduce_{time.strftime('%Y%m%d_%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(a.threads)
    t0, cpu0 = time.time(), time.process_time()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    print(f"caldpo reproduce: seeds {a.seeds}, betas {a.betas}, {a.n_train} pairs, {a.epochs} epoch(s), out {out}",
          flush=True)
    results = [run_seed(s, out, a) for s in a.seeds]
    seconds = time.time() - t0
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    cpu = time.process_time() - cpu0
    header = (f"Cal-DPO vs DPO on the synthetic ground-truth task (caldpo.eval.synthetic), off-policy: SFT on "
              f"{a.n_sft} uniform digit strings ({a.sft_epochs} epoch(s)), then {a.epochs} epoch(s) of each loss on "
              f"{a.n_train} pairs written by an even-digit teacher; tiny model, {len(a.seeds)} seed(s), betas "
              f"{' '.join(f'{b:g}' for b in a.betas)}, lr {PREFERENCE_LR:g}, AdamW, batch 16.\n"
              f"Machine: {platform.node()} {platform.machine()}, {torch.get_num_threads()} torch threads, "
              f"{os.cpu_count()} CPUs; load average {load0:.2f} -> {load1:.2f}; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall time {seconds:.0f} s, "
              f"CPU time of this process {cpu:.0f} s.")
    body, summary = summarise(results, a.betas)
    from caldpo.plot import plot_runs
    plotted = [b for b in a.betas if b == a.plot_beta] or a.betas[:1]
    runs = [out / f"seed{s}" / run_name(loss, b) for s in a.seeds for b in plotted for loss in LOSSES]
    plot = plot_runs(runs, out / "reward_dynamics.png",
                     labels=[f"{loss} seed {s}" for s in a.seeds for _ in plotted for loss in LOSSES],
                     title=f"reward dynamics on the off-policy synthetic task: DPO vs Cal-DPO (beta={plotted[0]:g})")
    table = f"{header}\n\n{body}\n\nPlot: {plot}"
    print("\n" + table, flush=True)
    (out / "table.txt").write_text(table + "\n")
    report = {"args": vars(a), "seconds": seconds, "cpu_seconds": cpu, "summary": summary, "results": results,
              "plot": str(plot)}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    return report


if __name__ == "__main__":
    from caldpo.cli import main as _main

    def _work() -> None:
        main()

    _main(_work, errors=(TruncationError,))
