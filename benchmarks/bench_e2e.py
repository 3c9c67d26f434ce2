"""End to end on CPU: caldpo's trainer against TRL's ``DPOTrainer`` on the same model, data and batches.

Every trainer runs in a process of its own (peak RSS is that process's), on:

* the same model: a randomly initialised Pythia-shaped GPT-NeoX built locally (default
  hidden 256, 4 layers, 4 heads, output vocabulary 8192: 7.35M parameters), fp32;
* the same HH-format data, synthesized here: multi-turn ``\\n\\nHuman: ... \\n\\nAssistant: ...``
  dialogues with log-normal turn and reply lengths (words drawn from the shipped sample),
  some pairs longer than ``max_length``;
* the same batches: 8 pairs per optimizer step, in caldpo's data order (TRL reads the pairs
  in that order through a sequential sampler), RMSprop, beta 0.1, no warm-up, the reference
  model run each step.

Columns: caldpo with its default layout (``prefix_shared``), caldpo ``layout=padded``, and TRL
(DPO only: TRL has no Cal-DPO). The runs are interleaved A B C, C B A, ... over ``--rounds``
rounds; per run the step times after ``--warmup`` steps are timed (the interval between
successive step ends, data loading included), and the table gives the medians over rounds.

tokens/s counts the same tokens for every trainer: the non-padding tokens of chosen and
rejected, the prompt counted in each (caldpo: its batch's attention masks; TRL: the
policy forward's attention mask), divided by the step time. Each trainer truncates by its
own rule (caldpo: prompt to ``max_prompt_length`` then responses; TRL: prompt + response to
``max_length``), so the token counts per step differ slightly; tokens/s compares the work.

    python benchmarks/bench_e2e.py                  # the CPU table (TRL if installed)
    python benchmarks/bench_e2e.py --dry-run        # 1 step each, tiny model, no TRL
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BETA = 0.1
LR = 5e-7


# ----------------------------------------------------------------------------- inputs

def build_model(out: Path, hidden: int, layers: int, heads: int, vocab: int, max_len: int) -> Path:
    """The tiny build's tokenizer and a GPT-NeoX of the given shape, vocabulary widened to ``vocab``."""
    from caldpo.train.tiny import build_widened
    return build_widened(out, vocab=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                         max_position_embeddings=max_len)


def synthesize_hh(out_dir: Path, n_train: int, n_test: int, tokenizer, max_length: int, seed: int = 0) -> dict:
    """HH-format ``train.jsonl``/``test.jsonl``: 1-5 turns, log-normal lengths (in words), unique prompts.

    A prompt is redrawn until it has fewer than ``max_length - 8`` tokens: TRL drops a pair whose
    prompt alone fills ``max_length`` (caldpo cuts it), which would change the batches. Prompt +
    response still exceeds ``max_length`` in some pairs (each trainer truncates by its own rule).
    """
    from caldpo.train.sample import sample_path
    words = []
    with open(sample_path("train"), encoding="utf-8") as f:
        for line in f:
            words += json.loads(line)["chosen"].replace("Human:", " ").replace("Assistant:", " ").split()
    words = [w for w in words if w.isascii()] or ["word"]
    rng = random.Random(seed)

    def text(median: float, sigma: float, cap: int) -> str:
        n = max(1, min(cap, int(rng.lognormvariate(math.log(median), sigma))))
        return " ".join(rng.choice(words) for _ in range(n))

    stats = {"prompt_words": [], "response_words": []}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                while True:
                    turns = min(5, 1 + int(rng.expovariate(0.8)))
                    prompt = ""
                    for t in range(turns):
                        prompt += "\n\nHuman: " + (f"({split} {i}) " if t == 0 else "")  # unique prompts
                        prompt += text(18, 0.8, 200)
                        if t < turns - 1:
                            prompt += "\n\nAssistant: " + text(35, 0.8, 250)
                    prompt += "\n\nAssistant:"
                    if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) < max_length - 8:
                        break
                chosen, rejected = " " + text(40, 0.9, 400), " " + text(35, 0.9, 400)
                stats["prompt_words"].append(len(prompt.split()))
                stats["response_words"].append(len(chosen.split()))
                f.write(json.dumps({"chosen": prompt + chosen, "rejected": prompt + rejected}) + "\n")
    return {k: {"median": statistics.median(v), "max": max(v)} for k, v in stats.items()}


def caldpo_overrides(args, model_dir: Path, data_dir: Path, loss: str, layout: str, run_dir: Path) -> list[str]:
    over = ["model=hf", f"model.name_or_path={model_dir}", "model.block_name=GPTNeoXLayer",
            "model.reference_dtype=float32", "model.policy_dtype=float32", "datasets=[hh]",
            f"data.paths.hh={data_dir}", f"loss={loss}", f"loss.beta={BETA}", f"layout={layout}", "device=cpu",
            f"batch_size={args.pairs}", "optimizer=RMSprop", f"lr={LR}", "warmup_steps=0",
            f"max_length={args.max_length}", f"max_prompt_length={args.max_length // 2}",
            f"n_examples={args.pairs * (args.steps + args.warmup)}", "do_first_eval=false",
            "eval_every=100000000", "n_eval_examples=1", "eval_batch_size=1", "export_hf=false",
            f"run_dir={run_dir}", "resume=never", "debug=true", "seed=0", f"kernels.backend={args.kernels}"]
    if loss == "caldpo":
        over.append("loss.calibration_weight=1.0")
    return over


# ----------------------------------------------------------------------------- workers

def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_order(args) -> None:
    """The pairs of the timed steps in caldpo's order, as (prompt, chosen, rejected) texts."""
    from caldpo.train.config import load_config
    from caldpo.train.trainer import Trainer
    cfg = load_config(caldpo_overrides(args, Path(args.model_dir), Path(args.data_dir), "dpo", "padded",
                                       Path(args.scratch) / "order_run"))
    tr = Trainer(cfg)
    idx = tr.schedule.indices(0, args.pairs * (args.steps + args.warmup))
    rows = [{"prompt": tr.train_data.items[i].prompt, "chosen": tr.train_data.items[i].chosen,
             "rejected": tr.train_data.items[i].rejected} for i in idx]
    Path(args.out_json).write_text(json.dumps(rows))


def worker_caldpo(args) -> None:
    t_start = time.perf_counter()
    from caldpo.train.config import load_config
    from caldpo.train.trainer import Trainer
    cfg = load_config(caldpo_overrides(args, Path(args.model_dir), Path(args.data_dir), args.loss, args.layout,
                                       Path(args.scratch) / f"run_{args.loss}_{args.layout}_{os.getpid()}"))
    tr = Trainer(cfg)
    order = json.loads(Path(args.order).read_text())
    steps, tokens, backbone, losses = [], [], [], []
    last = time.perf_counter()
    setup = last - t_start
    for s in range(args.steps + args.warmup):
        indices = tr.schedule.indices(s * args.pairs, args.pairs)
        assert [tr.train_data.items[i].prompt for i in indices] == \
            [r["prompt"] for r in order[s * args.pairs:(s + 1) * args.pairs]], "caldpo's order changed"
        out = tr.train_step(indices)
        now = time.perf_counter()
        steps.append(now - last)
        last = now
        tokens.append(out["tokens"])
        backbone.append(out["backbone_tokens"])
        losses.append(out["loss"])
    Path(args.out_json).write_text(json.dumps({
        "step_seconds": steps, "tokens": tokens, "backbone_tokens": backbone, "loss": losses,
        "layout": tr.layout, "setup_seconds": setup, "wall_seconds": time.perf_counter() - t_start,
        "peak_rss_mib": _rss_mib()}))


def worker_trl(args) -> None:
    t_start = time.perf_counter()
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    order = json.loads(Path(args.order).read_text())
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    tok.pad_token = tok.eos_token
    policy = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ref = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    counted = {"tokens": 0.0}

    def count(module, a, kw):
        if module.training and kw.get("attention_mask") is not None:
            counted["tokens"] += float(kw["attention_mask"].sum())
    policy.register_forward_pre_hook(count, with_kwargs=True)

    marks = {"steps": [], "tokens": [], "last": None}

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            marks["last"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            marks["steps"].append(now - marks["last"])
            marks["tokens"].append(counted["tokens"])
            counted["tokens"] = 0.0
            marks["last"] = now

    class Sequential(DPOTrainer):
        def _get_train_sampler(self, *a, **kw):  # caldpo's order, as written by worker_order
            return SequentialSampler(self.train_dataset)

    cfg = DPOConfig(output_dir=str(Path(args.scratch) / f"trl_{os.getpid()}"), per_device_train_batch_size=args.pairs,
                    gradient_accumulation_steps=1, max_steps=args.steps + args.warmup, learning_rate=LR,
                    optim="rmsprop", lr_scheduler_type="constant", warmup_steps=0, beta=BETA, loss_type=["sigmoid"],
                    max_length=args.max_length, max_grad_norm=10.0, use_cpu=True, bf16=False, fp16=False,
                    report_to=[], save_strategy="no", eval_strategy="no", logging_steps=10 ** 6,
                    dataloader_num_workers=0, seed=0, disable_tqdm=True, precompute_ref_log_probs=False)
    trainer = Sequential(model=policy, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(order),
                         processing_class=tok, callbacks=[Clock()])
    if len(trainer.train_dataset) != len(order):
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(order)} pairs: the batches would differ")
    setup = time.perf_counter() - t_start
    trainer.train()
    Path(args.out_json).write_text(json.dumps({
        "step_seconds": marks["steps"], "tokens": marks["tokens"], "setup_seconds": setup,
        "wall_seconds": time.perf_counter() - t_start, "peak_rss_mib": _rss_mib(),
        "trl": __import__("trl").__version__}))


# ----------------------------------------------------------------------------- driver

def _spawn(args, role: str, out_json: Path, **extra) -> dict:
    """Run a worker in a fresh process (its peak RSS its own); a dry run calls it in this process."""
    if args.dry_run:
        t = time.perf_counter()
        ns = argparse.Namespace(**{**vars(args), **extra, "out_json": out_json})
        {"order": worker_order, "caldpo": worker_caldpo, "trl": worker_trl}[role](ns)
        out = json.loads(out_json.read_text())
        if isinstance(out, dict):
            out["process_seconds"] = time.perf_counter() - t
        return out
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--out-json", str(out_json)]
    for k in ("model_dir", "data_dir", "scratch", "order"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    for k in ("steps", "warmup", "pairs", "max_length", "kernels"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    for k, v in extra.items():
        cmd += [f"--{k}", v]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(REPO), "ACCELERATE_DISABLE_RICH": "1", "TRANSFORMERS_VERBOSITY": "error"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{role} {extra} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(out_json.read_text())
    if isinstance(out, dict):
        out["process_seconds"] = time.perf_counter() - t
    return out


def _summary(runs: list[dict], warmup: int) -> dict:
    """Medians over rounds of each run's median timed step; tokens/s from the timed steps' totals."""
    per_run = []
    for r in runs:
        secs, toks = r["step_seconds"][warmup:], r["tokens"][warmup:]
        per_run.append({"step_s": statistics.median(secs), "tok_s": sum(toks) / sum(secs),
                        "rss": r["peak_rss_mib"], "proc_s": r["process_seconds"]})
    med = {k: statistics.median(p[k] for p in per_run) for k in per_run[0]}
    tokens_per_step = statistics.median(statistics.median(r["tokens"][warmup:]) for r in runs)
    out = {"median_step_seconds": med["step_s"], "tokens_per_second": med["tok_s"],
           "peak_rss_mib": med["rss"], "process_seconds": med["proc_s"], "tokens_per_step": tokens_per_step,
           "tokens_per_second_each_round": [p["tok_s"] for p in per_run]}
    if "loss" in runs[0]:
        out["first_step_loss"] = runs[0]["loss"][0]
    if "backbone_tokens" in runs[0]:
        out["backbone_tokens_per_step"] = statistics.median(statistics.median(r["backbone_tokens"][warmup:])
                                                            for r in runs)
    return out


def compare(results: dict, with_trl: bool) -> dict:
    """tokens/s ratios, each the median over rounds of that round's ratio: the runs of one round
    are neighbours in time, so a load change on a shared machine moves both sides of a ratio."""
    def ratio(a: str, b: str) -> float:
        ra, rb = results[a]["tokens_per_second_each_round"], results[b]["tokens_per_second_each_round"]
        return statistics.median(x / y for x, y in zip(ra, rb))
    out = {}
    for loss in ("dpo", "caldpo"):
        out[f"{loss}: prefix_shared / padded"] = ratio(f"{loss}/caldpo/prefix_shared", f"{loss}/caldpo/padded")
    if with_trl:
        for layout in ("prefix_shared", "padded"):
            out[f"dpo: caldpo {layout} / TRL"] = ratio(f"dpo/caldpo/{layout}", "dpo/trl")
        out["dpo: TRL peak RSS / caldpo prefix_shared"] = (results["dpo/trl"]["peak_rss_mib"]
                                                          / results["dpo/caldpo/prefix_shared"]["peak_rss_mib"])
    return out


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        info["lscpu"] = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    except OSError:
        pass
    import torch
    import transformers
    info["torch"], info["transformers"] = torch.__version__, transformers.__version__
    return info


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--role", default="driver", choices=("driver", "order", "caldpo", "trl"))
    p.add_argument("--dry-run", action="store_true", help="1 step each on a tiny model, no TRL")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps per run")
    p.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per trainer (1: robust when other processes share the cores)")
    p.add_argument("--no-trl", action="store_true", help="skip TRL even when installed")
    p.add_argument("--kernels", default="torch", help="caldpo's kernels.backend, pinned so that every run "
                   "uses the same head (auto may build the native extension mid-benchmark)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: print only)")
    for k in ("model-dir", "data-dir", "scratch", "order", "out-json", "loss", "layout"):
        p.add_argument(f"--{k}")
    args = p.parse_args(argv)
    if args.role == "order":
        return worker_order(args)
    if args.role == "caldpo":
        return worker_caldpo(args)
    if args.role == "trl":
        return worker_trl(args)

    if args.dry_run:
        args.rounds, args.steps, args.warmup, args.pairs = 1, 1, 0, 2
        args.hidden, args.layers, args.heads, args.vocab, args.max_length = 64, 2, 4, 512, 128
        args.no_trl = True
    import importlib.util
    with_trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        tmp = Path(tmp)
        args.scratch = tmp
        args.model_dir = build_model(tmp / "model", args.hidden, args.layers, args.heads, args.vocab,
                                     max(1024, 2 * args.max_length))
        n_train = args.pairs * (args.steps + args.warmup) + 8
        from transformers import AutoTokenizer
        data_stats = synthesize_hh(tmp / "data", n_train, 8, AutoTokenizer.from_pretrained(args.model_dir),
                                   args.max_length)
        args.data_dir = tmp / "data"
        args.order = tmp / "order.json"
        _spawn(args, "order", args.order)
        columns = [("dpo", "caldpo", "prefix_shared"), ("dpo", "caldpo", "padded")]
        if with_trl:
            columns.append(("dpo", "trl", None))
        columns += [("caldpo", "caldpo", "prefix_shared"), ("caldpo", "caldpo", "padded")]
        runs: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            for loss, who, layout in (columns if r % 2 == 0 else columns[::-1]):
                key = f"{loss}/{who}" + (f"/{layout}" if layout else "")
                out_json = tmp / f"{key.replace('/', '_')}_{r}.json"
                extra = {"loss": loss} if who == "trl" else {"loss": loss, "layout": layout}
                runs.setdefault(key, []).append(_spawn(args, who, out_json, **extra))
                print(f"round {r} {key}: {runs[key][-1]['process_seconds']:.1f}s", file=sys.stderr, flush=True)
    results = {k: _summary(v, args.warmup) for k, v in runs.items()}
    ratios = compare(results, with_trl)
    report = {"command": "python benchmarks/bench_e2e.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {k: getattr(args, k) for k in ("rounds", "steps", "warmup", "pairs", "max_length", "hidden",
                                                         "layers", "heads", "vocab", "threads", "kernels")},
              "data_words": data_stats, "results": results, "ratios": ratios, "machine": machine(),
              "trl": with_trl, "seconds": time.time() - t0, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))
    return report


def table(report: dict) -> str:
    lines = ["| loss | trainer | layout | tokens/s | median step (s) | tokens/step | backbone tokens/step | "
             "peak RSS (MiB) | process (s) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in report["results"].items():
        parts = key.split("/") + [""]
        bb = r.get("backbone_tokens_per_step")
        lines.append(f"| {parts[0]} | {parts[1]} | {parts[2] or '-'} | {r['tokens_per_second']:.0f} | "
                     f"{r['median_step_seconds']:.3f} | {r['tokens_per_step']:.0f} | "
                     f"{'-' if bb is None else f'{bb:.0f}'} | {r['peak_rss_mib']:.0f} | {r['process_seconds']:.1f} |")
    lines += ["", "Ratios (median over rounds of each round's ratio):"]
    lines += [f"- {k}: {v:.2f}x" for k, v in report["ratios"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
