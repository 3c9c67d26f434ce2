"""End to end: caldpo's trainer against TRL's ``DPOTrainer`` on the same model, data and batches (CPU; --stage gpu).

Every trainer runs in a process of its own (peak RSS is that process's). The CPU table (the default stage) uses:

* the same model: a randomly initialised Pythia-shaped GPT-NeoX built locally (default
  hidden 256, 4 layers, 4 heads, output vocabulary 8192: 7.35M parameters), fp32;
* the same HH-format data, synthesized here: multi-turn ``\\n\\nHuman: ... \\n\\nAssistant: ...``
  dialogues with log-normal turn and reply lengths (words drawn from the shipped sample),
  each pair redrawn until neither trainer truncates it;
* the same batches: 8 pairs per optimizer step, in caldpo's data order (TRL reads the pairs
  in that order through a sequential sampler), RMSprop, beta 0.1, no warm-up, the reference
  model run each step.

Columns: caldpo with its default layout (``prefix_shared``), caldpo ``layout=padded``, and TRL
(DPO only: TRL has no Cal-DPO). The runs are interleaved A B C, C B A, ... over ``--rounds``
rounds; per run the step times after ``--warmup`` steps are timed (the interval between
successive step ends, data loading included), and the table gives the medians over rounds.

tokens/s counts the same tokens for every trainer: the non-padding tokens of chosen and
rejected, the prompt counted in each (caldpo: its batch's attention masks; TRL: the
policy forward's attention mask), divided by the step time. No pair is truncated, and the
workers raise an error when the trainers' token counts for a step differ.

TRL runs with gradient checkpointing off (its DPOConfig default is on), as caldpo does.

    python benchmarks/bench_e2e.py                  # the CPU table (TRL if installed)
    python benchmarks/bench_e2e.py --dry-run        # 1 step each, tiny model, no TRL

``--stage gpu`` (one CUDA device, a time box of ``--budget-s``, written after every column):
Pythia-2.8B then Pythia-1.4B shapes (GPT-NeoX as the real configs: hidden 2560/2048, 32/24
layers, 32/16 heads, FFN 4 x hidden, vocabulary 50304, rotary_pct 0.25, parallel residual),
random weights built on the GPU in bf16 and saved once (``tiny.build_random``, no download),
the same synthesized HH-format data at ``max_length`` 512, the same batches (8 pairs per step),
RMSprop. Columns, each in a process of its own, one round, ``--warmup`` untimed steps then
``--steps`` timed ones: caldpo Cal-DPO (``loss=caldpo``) with ``trainer=FSDPTrainer`` on one GPU
(FSDP2), fp32 master weights with ``model.fsdp_policy_mp=bfloat16``, the reference model in
``--reference-dtype`` (bfloat16; the authors' Pythia configs use float16), layouts
``prefix_shared`` and ``padded`` (SDPA; ``--columns`` adds e.g. ``prefix_shared:flex_attention``);
then TRL's ``DPOTrainer`` (bf16=True autocast over fp32 weights, the reference model in
``--reference-dtype``, SDPA, sigmoid DPO: TRL has no Cal-DPO). Per column: tokens/s (counted
as above), the useful-work MFU (``caldpo.train.metrics.FlopCount``: policy forward and
backward plus the reference forward; each pair's prompt once, no padding, causal attention,
the head on scored tokens), the same formula and work for every column, TRL's included, and peak
GPU memory (``torch.cuda.max_memory_allocated`` over the worker process). A column that runs
out of memory is recorded as ``oom``; one that no longer fits the time box as ``skipped``.

    python benchmarks/bench_e2e.py --stage gpu --out-dir DIR [--results-dir benchmarks/results]
    python benchmarks/bench_e2e.py --stage gpu --dry-run --out-dir DIR   # CPU, tiny shape, fp32 (a test)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
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

def synthesize_hh(out_dir: Path, n_train: int, n_test: int, tokenizer, max_length: int, seed: int = 0) -> dict:
    """HH-format ``train.jsonl``/``test.jsonl``: 1-5 turns, log-normal lengths (in words), unique prompts.

    A pair is redrawn until neither trainer truncates it: prompt + each response + EOS within
    ``max_length`` tokens and the prompt within ``max_length // 2`` (caldpo's ``max_prompt_length``
    here), so that both trainers run exactly the same tokens (the workers compare their counts).
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

    def n_tokens(t: str) -> int:
        return len(tokenizer(t, add_special_tokens=False)["input_ids"])

    stats = {"prompt_words": [], "response_words": [], "redrawn": 0}
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
                    chosen, rejected = " " + text(40, 0.9, 400), " " + text(35, 0.9, 400)
                    p = n_tokens(prompt)
                    if p <= max_length // 2 and max(n_tokens(prompt + chosen), n_tokens(prompt + rejected)) + 1 <= max_length:
                        break
                    stats["redrawn"] += 1
                stats["prompt_words"].append(len(prompt.split()))
                stats["response_words"].append(len(chosen.split()))
                f.write(json.dumps({"chosen": prompt + chosen, "rejected": prompt + rejected}) + "\n")
    return {k: {"median": statistics.median(v), "max": max(v)} if isinstance(v, list) else v for k, v in stats.items()}


def caldpo_overrides(args, model_dir: Path, data_dir: Path, loss: str, layout: str, run_dir: Path,
                     **settings: str) -> list[str]:
    """caldpo's command-line overrides for one run; ``settings`` replace or add keys (``device``,
    ``trainer``, ``model.fsdp_policy_mp``, ...: Hydra refuses a key given twice)."""
    over = {"model": "hf", "model.name_or_path": model_dir, "model.block_name": "GPTNeoXLayer",
            "model.reference_dtype": "float32", "model.policy_dtype": "float32", "datasets": "[hh]",
            "data.paths.hh": data_dir, "loss": loss, "loss.beta": BETA, "layout": layout, "device": "cpu",
            "batch_size": args.pairs, "optimizer": "RMSprop", "lr": LR, "warmup_steps": 0,
            "max_length": args.max_length, "max_prompt_length": args.max_length // 2,
            "n_examples": args.pairs * (args.steps + args.warmup), "do_first_eval": "false",
            "eval_every": 100000000, "n_eval_examples": 1, "eval_batch_size": 1, "export_hf": "false",
            "run_dir": run_dir, "resume": "never", "debug": "true", "seed": 0, "kernels.backend": args.kernels}
    if loss == "caldpo":
        over["loss.calibration_weight"] = "1.0"
    over.update(settings)
    return [f"{k}={v}" for k, v in over.items()]


def gpu_settings(args, attn: str) -> dict[str, str]:
    """The GPU stage's caldpo settings: FSDP2 on one device; on CUDA the authors' mixed precision
    (fp32 master weights, bf16 compute through FSDP2's MixedPrecisionPolicy, 16-bit reference)."""
    cuda = args.device == "cuda"
    return {"trainer": "FSDPTrainer", "allow_one_gpu": "true", "device": args.device,
            "model.policy_dtype": "float32", "model.fsdp_policy_mp": "bfloat16" if cuda else "null",
            "model.reference_dtype": args.reference_dtype if cuda else "float32",
            "model.attn_implementation": attn}


# ----------------------------------------------------------------------------- workers

def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpu_mib(device) -> float | None:
    import torch
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _is_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


WORK = ("useful_tokens", "attention_context", "scored_tokens")


class StepClock:
    """Per-step time, tokens and MFU through caldpo's ``Throughput`` (the trainer's own formula and
    CUDA synchronisation): ``lap`` at each step end closes the interval since the previous one.

    MFU is the useful-work MFU (``caldpo.train.metrics.FlopCount``): the same formula and the same
    work for every column, TRL's included: each step's ``token_work`` (useful tokens, their causal
    attention context, scored tokens) as caldpo's collator counts it for that step's pairs
    (``worker_order``). None where the peak FLOP/s is unknown.
    """

    def __init__(self, throughput, peak_tflops: float | None):
        self.thr = throughput
        if peak_tflops:
            self.thr.peak = peak_tflops * 1e12
        self.rec = {k: [] for k in ("step_seconds", "tokens", "backbone_tokens", "sequences", "mfu", *WORK)}

    def start(self) -> None:
        self.thr.start()

    def lap(self, tokens: float, backbone: float, sequences: float, work: dict) -> None:
        m = self.thr.stop(tokens, **{k: work[k] for k in WORK})
        self.thr.start()
        for k, v in (("step_seconds", m["step_time"]), ("tokens", tokens), ("backbone_tokens", backbone),
                     ("sequences", sequences), ("mfu", m.get("mfu")), *((k, work[k]) for k in WORK)):
            self.rec[k].append(v)

    def result(self, device, **more) -> dict:
        f = self.thr.flops
        return {"status": "ok", **self.rec, **more, "peak_rss_mib": _rss_mib(), "peak_gpu_mib": _gpu_mib(device),
                "body_params": f.body_params, "head_params": f.head_params, "n_layers": f.layers,
                "hidden": f.hidden, "with_reference": f.reference, "peak_flops": self.thr.peak}


def _failed(e: BaseException, device, clock: StepClock | None, **more) -> dict:
    """An out-of-memory column is a result (status ``oom``) with what it measured before; others raise."""
    if not _is_oom(e):
        raise e
    out = clock.result(device, **more) if clock is not None else {"peak_rss_mib": _rss_mib(),
                                                                   "peak_gpu_mib": _gpu_mib(device)}
    return {**out, "status": "oom", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def worker_order(args) -> None:
    """The pairs of the timed steps in caldpo's order, as (prompt, chosen, rejected) texts, and each step's
    counts as caldpo's collator makes them (``tokens``: chosen + rejected, the prompt in each; and
    ``metrics.token_work``'s), which every column's MFU uses and TRL's own count is checked against."""
    from caldpo.train.config import load_config
    from caldpo.train.trainer import Trainer
    cfg = load_config(caldpo_overrides(args, Path(args.model_dir), Path(args.data_dir), "dpo", "padded",
                                       Path(args.scratch) / "order_run", **{"kernels.backend": "torch"}))
    tr = Trainer(cfg)
    try:
        rows, steps = [], []
        for s in range(args.steps + args.warmup):
            idx = tr.schedule.indices(s * args.pairs, args.pairs)
            items = [tr.train_data.items[i] for i in idx]
            rows += [{"prompt": it.prompt, "chosen": it.chosen, "rejected": it.rejected} for it in items]
            batch = tr.collate(items, idx, "train")
            steps.append({k: batch[k] for k in ("tokens", *WORK)})
        Path(args.out_json).write_text(json.dumps({"rows": rows, "steps": steps}))
    finally:
        tr.process.close()


def worker_caldpo(args) -> None:
    t_start = time.perf_counter()
    from caldpo.train.config import load_config
    from caldpo.train.trainer import Trainer
    settings = (gpu_settings(args, args.attn) if args.stage == "gpu"
                else {"model.attn_implementation": args.attn} if args.attn else {})
    cfg = load_config(caldpo_overrides(args, Path(args.model_dir), Path(args.data_dir), args.loss, args.layout,
                                       Path(args.scratch) / f"run_{args.loss}_{args.layout}_{args.attn or 'auto'}_{os.getpid()}",
                                       **settings))
    tr = Trainer(cfg)
    try:
        order = json.loads(Path(args.order).read_text())
        rows, steps = order["rows"], order["steps"]
        clock, losses, logps = StepClock(tr.throughput, args.peak_tflops), [], []  # logps: mean chosen, rejected
        setup = time.perf_counter() - t_start
        try:
            clock.start()
            for s in range(args.steps + args.warmup):
                indices = tr.schedule.indices(s * args.pairs, args.pairs)
                assert [tr.train_data.items[i].prompt for i in indices] == \
                    [r["prompt"] for r in rows[s * args.pairs:(s + 1) * args.pairs]], "caldpo's order changed"
                out = tr.train_step(indices)
                if [out[k] for k in ("tokens", *WORK)] != [steps[s][k] for k in ("tokens", *WORK)]:
                    raise RuntimeError(f"step {s}: this run's token counts {[out[k] for k in ('tokens', *WORK)]} "
                                       f"differ from the order's {steps[s]}")
                clock.lap(out["tokens"], out["backbone_tokens"], out["sequences"], steps[s])
                losses.append(out["loss"])
                logps.append([out.get("logps/chosen"), out.get("logps/rejected")])
            res = clock.result(tr.device, loss=losses, logps=logps)
        except Exception as e:  # noqa: BLE001 (out of memory is a result; anything else raises)
            res = _failed(e, tr.device, clock, loss=losses, logps=logps)
        mp = cfg.model.fsdp_policy_mp
        res.update(layout=tr.layout, attention=tr.attn, setup_seconds=setup, wall_seconds=time.perf_counter() - t_start,
                   precision=(f"fp32 weights, {mp} compute (FSDP2 MixedPrecisionPolicy), reference "
                              f"{cfg.model.reference_dtype}") if mp else cfg.model.policy_dtype)
        Path(args.out_json).write_text(json.dumps(res))
    finally:
        tr.process.close()  # a dry run calls the workers in one process: the next one starts its own group


def worker_trl(args) -> None:
    t_start = time.perf_counter()
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from caldpo.hf import from_pretrained
    from caldpo.train.metrics import FlopCount, Throughput
    from caldpo.train.model import count_matmul_params

    cuda = args.device == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    order = json.loads(Path(args.order).read_text())
    steps = order["steps"]
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    tok.pad_token = tok.eos_token
    attn = args.attn or "sdpa"
    policy = from_pretrained(AutoModelForCausalLM, args.model_dir, dtype=torch.float32, attn_implementation=attn)
    ref = from_pretrained(AutoModelForCausalLM, args.model_dir,
                          dtype=getattr(torch, args.reference_dtype) if cuda else torch.float32, attn_implementation=attn)
    n_params, n_layers, hidden, _ = count_matmul_params(policy)
    head = policy.get_output_embeddings().weight.numel()
    clock = StepClock(Throughput(FlopCount(n_params - head, head, n_layers, hidden, reference=True), device, world=1),
                      args.peak_tflops)
    counted = {"tokens": 0, "backbone": 0, "sequences": 0, "step": 0}

    def count(module, a, kw):  # the policy's training forwards (the reference runs in eval mode)
        mask = kw.get("attention_mask")
        if module.training and mask is not None:
            counted["tokens"] = counted["tokens"] + mask.sum()  # stays on the device: no sync per forward
            counted["backbone"] += mask.numel()
            counted["sequences"] += mask.shape[0]
    policy.register_forward_pre_hook(count, with_kwargs=True)

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock.start()

        def on_step_end(self, a, state, control, **kw):
            s = counted["step"]
            tokens = float(counted["tokens"])  # TRL's own count (one sync per step, as its logging makes)
            if tokens != steps[s]["tokens"]:
                raise RuntimeError(f"step {s}: TRL ran {tokens:.0f} tokens, caldpo {steps[s]['tokens']} on the same "
                                   "pairs: one of them truncated or tokenized differently")
            clock.lap(tokens, float(counted["backbone"]), float(counted["sequences"]), steps[s])
            counted.update(tokens=0, backbone=0, sequences=0, step=s + 1)

    class Sequential(DPOTrainer):
        def _get_train_sampler(self, *a, **kw):  # caldpo's order, as written by worker_order
            return SequentialSampler(self.train_dataset)

    cfg = DPOConfig(output_dir=str(Path(args.scratch) / f"trl_{os.getpid()}"), per_device_train_batch_size=args.pairs,
                    gradient_accumulation_steps=1, max_steps=args.steps + args.warmup, learning_rate=LR,
                    optim="rmsprop", lr_scheduler_type="constant", warmup_steps=0, beta=BETA, loss_type=["sigmoid"],
                    max_length=args.max_length, max_grad_norm=10.0, use_cpu=not cuda, bf16=cuda, fp16=False,
                    gradient_checkpointing=args.trl_gradient_checkpointing,
                    report_to=[], save_strategy="no", eval_strategy="no", logging_steps=10 ** 6,
                    dataloader_num_workers=0, seed=0, disable_tqdm=True, precompute_ref_log_probs=False)
    trainer = Sequential(model=policy, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(order["rows"]),
                         processing_class=tok, callbacks=[Clock()])
    if len(trainer.train_dataset) != len(order["rows"]):
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(order['rows'])} pairs: the batches would differ")
    setup = time.perf_counter() - t_start
    try:
        trainer.train()
        res = clock.result(device)
    except Exception as e:  # noqa: BLE001 (out of memory is a result; anything else raises)
        res = _failed(e, device, clock)
    res.update(setup_seconds=setup, wall_seconds=time.perf_counter() - t_start, trl=__import__("trl").__version__,
               gradient_checkpointing=args.trl_gradient_checkpointing,
               precision=("fp32 weights under bf16 autocast (bf16=True), reference " + args.reference_dtype) if cuda
               else "fp32")
    Path(args.out_json).write_text(json.dumps(res))


# ----------------------------------------------------------------------------- driver

FORWARDED = ("model_dir", "data_dir", "scratch", "order", "steps", "warmup", "pairs", "max_length", "kernels",
             "stage", "device", "reference_dtype", "peak_tflops")


def worker_command(args, role: str, out_json: Path, **extra) -> list[str]:
    """The command line of a worker process: the driver's settings (``FORWARDED``) and the column's."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--out-json", str(out_json)]
    for k in FORWARDED:
        if getattr(args, k) is not None:
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.trl_gradient_checkpointing:
        cmd.append("--trl-gradient-checkpointing")
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def _spawn(args, role: str, out_json: Path, timeout: float | None = None, **extra) -> dict:
    """Run a worker in a fresh process (its peak RSS and GPU memory its own); a dry run calls it in this
    process. Raises RuntimeError (the worker's output tail) when it fails, subprocess.TimeoutExpired."""
    if args.dry_run:
        t = time.perf_counter()
        ns = argparse.Namespace(**{**vars(args), **extra, "out_json": out_json})
        {"order": worker_order, "caldpo": worker_caldpo, "trl": worker_trl}[role](ns)
        out = json.loads(out_json.read_text())
        if isinstance(out, dict):
            out["process_seconds"] = time.perf_counter() - t
        return out
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
           "ACCELERATE_DISABLE_RICH": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if args.device == "cuda":
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    t = time.perf_counter()
    proc = subprocess.run(worker_command(args, role, out_json, **extra), cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{role} {extra} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    out = json.loads(out_json.read_text())
    if isinstance(out, dict):
        out["process_seconds"] = time.perf_counter() - t
        if args.stage == "gpu":  # the trainer's own lines (model, attention, layout, kernels, autotuning)
            out["log_tail"] = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
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
    if "dpo/caldpo/prefix_shared+sdpa" in results:
        out["dpo: prefix_shared segments / dense masks"] = ratio("dpo/caldpo/prefix_shared",
                                                                 "dpo/caldpo/prefix_shared+sdpa")
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


# ----------------------------------------------------------------------------- GPU stage

# Pythia's configs (EleutherAI/pythia-2.8b and -1.4b config.json: GPT-NeoX, FFN 4 x hidden, rotary_pct 0.25,
# parallel residual, untied head, 2048 positions); "tiny" is the dry run's.
GPU_SHAPES = {"pythia-2.8b": {"hidden": 2560, "layers": 32, "heads": 32, "vocab": 50304},
              "pythia-1.4b": {"hidden": 2048, "layers": 24, "heads": 16, "vocab": 50304},
              "tiny": {"hidden": 64, "layers": 2, "heads": 4, "vocab": 512}}
GPU_COLUMNS = "prefix_shared:varlen,padded:sdpa,trl"
# issue 18's targets: useful-work MFU, caldpo over TRL, prefix sharing over padding (tokens/s)
MFU_TARGET, MFU_TARGET_SHAPE, TRL_TARGET, SHARING_TARGET = 0.45, "pythia-2.8b", 2.0, 1.8


def parse_columns(spec: str) -> list[tuple[str, str | None, str]]:
    """``prefix_shared:sdpa,padded,trl`` -> [(trainer, layout, attention)]; attention defaults to sdpa."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        if item == "trl":
            out.append(("trl", None, "sdpa"))
            continue
        layout, _, attn = item.partition(":")
        if layout not in ("prefix_shared", "packed", "padded"):
            raise SystemExit(f"bench_e2e: --columns {item!r}: a caldpo layout (prefix_shared, packed, padded) "
                             "with an optional :attention, or trl")
        out.append(("caldpo", layout, attn or "sdpa"))
    return out


def column_key(shape: str, who: str, layout: str | None, attn: str) -> str:
    if who == "trl":
        return f"{shape}/trl"
    return f"{shape}/caldpo/{layout}" + ("" if attn == "sdpa" else f"+{attn}")


def _weighted(values: list, secs: list[float]) -> float | None:
    """Time-weighted mean of per-step rates (the rate over the timed steps together); None if any is None."""
    if not values or any(v is None for v in values):
        return None
    return sum(v * t for v, t in zip(values, secs)) / sum(secs)


def summarize_column(run: dict, warmup: int) -> dict:
    """One column's numbers over its timed steps (after ``warmup``): tokens/s = timed tokens / timed seconds."""
    out = {k: run.get(k) for k in ("status", "reason", "peak_rss_mib", "peak_gpu_mib", "body_params", "head_params",
                                   "n_layers", "hidden", "setup_seconds", "process_seconds", "layout", "trl",
                                   "precision")}
    secs = (run.get("step_seconds") or [])[warmup:]
    if run.get("loss"):
        out["first_step_loss"] = run["loss"][0]
    if not secs:
        if out["status"] == "ok":
            out.update(status="error", reason="no timed step")
        return out
    tokens, backbone = run["tokens"][warmup:], run["backbone_tokens"][warmup:]
    out.update(tokens_per_second=sum(tokens) / sum(secs), median_step_seconds=statistics.median(secs),
               tokens_per_step=statistics.median(tokens), backbone_tokens_per_step=statistics.median(backbone),
               useful_tokens_per_step=statistics.median(run["useful_tokens"][warmup:]),
               mfu=_weighted(run["mfu"][warmup:], secs), timed_steps=len(secs))
    return out


def gpu_ratios(results: dict, shapes: list[str]) -> dict:
    """Per shape: tokens/s of caldpo's layouts over TRL and over each other, TRL's peak memory over caldpo's."""
    out: dict[str, float] = {}

    def ok(key):
        r = results.get(key)
        return r if r and r.get("status") == "ok" and r.get("tokens_per_second") else None

    for shape in shapes:
        ps = ok(f"{shape}/caldpo/prefix_shared+varlen") or ok(f"{shape}/caldpo/prefix_shared")
        pad, trl = ok(f"{shape}/caldpo/padded"), ok(f"{shape}/trl")
        for name, a in (("prefix_shared", ps), ("padded", pad)):
            if a and trl:
                out[f"{shape}: caldpo {name} / TRL"] = a["tokens_per_second"] / trl["tokens_per_second"]
        if ps and pad:
            out[f"{shape}: prefix_shared / padded"] = ps["tokens_per_second"] / pad["tokens_per_second"]
        mem = "peak_gpu_mib" if (trl or {}).get("peak_gpu_mib") else "peak_rss_mib"
        if ps and trl and ps.get(mem):
            out[f"{shape}: peak memory TRL / caldpo prefix_shared"] = trl[mem] / ps[mem]
    return out


def gpu_targets(results: dict, ratios: dict, shapes: list[str]) -> list[str]:
    """The issue's targets, each with the measured value and met / not met (or why it is unmeasured)."""
    lines = []
    mfus = {k: r["mfu"] for k, r in results.items() if k.startswith(f"{MFU_TARGET_SHAPE}/caldpo/")
            and r.get("status") == "ok" and r.get("mfu") is not None}
    if mfus:
        best = max(mfus.values())
        lines.append(f"useful-work MFU >= {MFU_TARGET:.0%} at {MFU_TARGET_SHAPE} (caldpo): "
                     + ", ".join(f"{k.split('/', 2)[2]} {v:.1%}" for k, v in mfus.items())
                     + (": met" if best >= MFU_TARGET else ": not met"))
    else:
        lines.append(f"useful-work MFU >= {MFU_TARGET:.0%} at {MFU_TARGET_SHAPE}: not measured "
                     f"({'not in --shapes' if MFU_TARGET_SHAPE not in shapes else 'no caldpo column with MFU'})")
    for shape in shapes:
        vs = {k.split(": caldpo ", 1)[1]: v for k, v in ratios.items() if k.startswith(f"{shape}: caldpo ")}
        if vs:
            lines.append(f"caldpo >= {TRL_TARGET:.0f}x TRL tokens/s at {shape}: "
                         + ", ".join(f"{k} {v:.2f}x ({'met' if v >= TRL_TARGET else 'not met'})" for k, v in vs.items()))
        else:
            lines.append(f"caldpo >= {TRL_TARGET:.0f}x TRL at {shape}: not measured (a column did not run)")
        sharing = ratios.get(f"{shape}: prefix_shared / padded")
        lines.append(f"prefix_shared >= {SHARING_TARGET}x padded tokens/s at {shape}: "
                     + (f"{sharing:.2f}x ({'met' if sharing >= SHARING_TARGET else 'not met'})" if sharing
                        else "not measured (a column did not run)"))
    return lines


def gpu_table(report: dict) -> str:
    """The GPU stage's markdown: settings, one row per column (skipped and failed ones with their reason),
    ratios and targets."""
    st = report["settings"]
    cuda = st["device"] == "cuda"
    mem = "peak GPU GiB" if cuda else "peak RSS GiB"
    lines = [f"# caldpo vs TRL end to end, {report['device_name']}, {report['date']}", "",
             f"`{report['command']}`", "",
             f"{st['pairs']} pairs per step (the same batches for every column), max_length {st['max_length']}, "
             f"{st['warmup']} warm-up + {st['steps']} timed steps, 1 process per column; "
             + ("caldpo: Cal-DPO, FSDP2 on one GPU, fp32 master weights with bf16 compute "
                f"(model.fsdp_policy_mp=bfloat16), reference {st['reference_dtype']}, kernels {st['kernels']}; "
                f"TRL {report.get('trl_version') or '-'}: sigmoid DPO (TRL has no Cal-DPO), bf16=True over fp32 "
                f"weights, reference {st['reference_dtype']}"
                if cuda else "on CPU: caldpo Cal-DPO, FSDP2 in one process (gloo), fp32; TRL: sigmoid DPO "
                "(TRL has no Cal-DPO), fp32")
             + f", gradient checkpointing {'on' if st['trl_gradient_checkpointing'] else 'off'} in both; TRL with its "
             "default head (materialised logits: TRL 1.16 also has a chunked log-prob head, use_liger_kernel=True, not "
             "used here). No pair is truncated by either trainer, and every step's token count is checked equal. "
             "tokens/s: non-padding chosen + rejected tokens, the prompt in each. MFU: useful work only "
             "(caldpo.train.metrics.FlopCount: each pair's prompt once, no padding, causal attention, the head on "
             "scored tokens; policy forward + backward + reference forward), the same formula and counts for "
             "every column.", "",
             f"| model | trainer | loss | layout | attention | precision | tokens/s | MFU | {mem} | "
             "median step (s) | tokens/step | useful tokens/step | backbone tokens/step | first-step loss | "
             "process (s) | status |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for key, r in report["results"].items():
        peak = r.get("peak_gpu_mib") if cuda else r.get("peak_rss_mib")
        status = r.get("status") or "-"
        if r.get("reason"):
            status += ": " + r["reason"].replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {r['shape']} | {r['trainer']} | {r['loss']} | {r.get('layout') or '-'} | {r['attention']} | "
                     f"{r.get('precision') or '-'} | {f(r.get('tokens_per_second'), '.0f')} | {f(r.get('mfu'), '.1%')} | "
                     f"{f(None if peak is None else peak / 1024, '.1f')} | "
                     f"{f(r.get('median_step_seconds'), '.3f')} | {f(r.get('tokens_per_step'), '.0f')} | "
                     f"{f(r.get('useful_tokens_per_step'), '.0f')} | "
                     f"{f(r.get('backbone_tokens_per_step'), '.0f')} | {f(r.get('first_step_loss'), '.6f')} | "
                     f"{f(r.get('process_seconds'), '.1f')} | {status} |")
    lines += ["", "Ratios (tokens/s, one round):"] + [f"- {k}: {v:.2f}x" for k, v in report["ratios"].items()]
    lines += ["", "Targets (issue 18):"] + [f"- {t}" for t in report["targets"]]
    if report.get("builds"):
        lines += ["", "Model builds (random weights, on the device, saved once): "
                  + ", ".join(f"{k} {v['params'] / 1e6:,.1f}M parameters in {v['seconds']:.1f} s"
                              for k, v in report["builds"].items())]
    lines.append(f"Stage: {report['seconds']:.0f} s of a {st['budget_s']:.0f} s time box.")
    return "\n".join(lines) + "\n"


def machine_tag(device_name: str) -> str:
    """``NVIDIA H200`` -> ``h200`` (the first name in caldpo's peak-FLOP/s table), else the name in lowercase."""
    from caldpo.train.metrics import PEAK_FLOPS
    known = [k for k in PEAK_FLOPS if k in device_name]
    return (known[0] if known else "".join(c if c.isalnum() else "_" for c in device_name).strip("_")).lower()


def _trl_missing() -> str | None:
    import importlib.util
    missing = [m for m in ("trl", "datasets", "accelerate") if importlib.util.find_spec(m) is None]
    return (f"not installed: {', '.join(missing)} (benchmarks/fetch_wheels.sh fetches the wheels; "
            "gpu_suite.sh installs them)") if missing else None


def run_gpu_stage(args, argv: list[str] | None) -> dict:
    """The GPU stage (see the module docstring): writes ``e2e_gpu.json`` and ``e2e_gpu.md`` to ``--out-dir``
    (and ``--results-dir/<machine>_<date>/``) after every column, prints the table, returns the report."""
    t0 = time.monotonic()
    import torch

    def left() -> float:
        return args.budget_s - (time.monotonic() - t0)

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_e2e --stage gpu: no CUDA device here (--dry-run runs the same code on CPU)")
    if args.dry_run:
        args.shapes, args.pairs, args.max_length, args.steps, args.warmup = "tiny", 2, 128, 1, 1
    min_column_s = args.min_column_s if args.min_column_s is not None else (45.0 if cuda else 0.0)
    columns, shapes = parse_columns(args.columns), [x for x in args.shapes.split(",") if x]
    for shape in shapes:
        if shape not in GPU_SHAPES:
            raise SystemExit(f"bench_e2e: --shapes {shape!r}: one of {', '.join(GPU_SHAPES)}")
    trl_missing = _trl_missing()
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    report = {"command": "python benchmarks/bench_e2e.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "stage": "gpu", "dry_run": args.dry_run, "device_name": device_name,
              "settings": {k: getattr(args, k) for k in ("device", "shapes", "columns", "steps", "warmup", "pairs",
                                                         "max_length", "kernels", "reference_dtype", "budget_s",
                                                         "trl_gradient_checkpointing", "peak_tflops")},
              "results": {}, "runs": {}, "builds": {}, "ratios": {}, "targets": [], "seconds": 0.0,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "trl_version": None}
    report["settings"]["min_column_s"] = min_column_s
    stamp_dir = None
    if args.results_dir is not None:
        stamp_dir = args.results_dir / f"{machine_tag(device_name) if cuda else 'cpu'}_{time.strftime('%Y%m%d')}"

    def write() -> None:
        report["ratios"] = gpu_ratios(report["results"], shapes)
        report["targets"] = gpu_targets(report["results"], report["ratios"], shapes)
        report["seconds"] = time.monotonic() - t0
        for d in filter(None, (args.out_dir, stamp_dir)):
            d.mkdir(parents=True, exist_ok=True)
            (d / "e2e_gpu.json").write_text(json.dumps(report, indent=1, default=str))
            (d / "e2e_gpu.md").write_text(gpu_table(report))

    def record(key: str, shape: str, who: str, layout, attn: str, run: dict) -> None:
        report["results"][key] = {"shape": shape, "trainer": who, "loss": "caldpo" if who == "caldpo" else "dpo",
                                  **summarize_column(run, args.warmup), "layout": layout,
                                  "attention": run.get("attention") or attn}  # what ran (a fallback says so)
        report["runs"][key] = run
        if run.get("trl"):
            report["trl_version"] = run["trl"]
        r = report["results"][key]
        print(f"[{time.monotonic() - t0:5.0f}s] {key}: {r['status']}"
              + (f" {r['tokens_per_second']:.0f} tokens/s" if r.get("tokens_per_second") else "")
              + (f" ({r['reason'][:200]})" if r.get("reason") else ""), file=sys.stderr, flush=True)
        write()

    from caldpo.train.tiny import build_random
    with tempfile.TemporaryDirectory(prefix="bench_e2e_gpu_") as tmp:
        tmp = Path(tmp)
        args.scratch, args.data_dir, args.order = tmp, tmp / "data", tmp / "order.json"
        # One tokenizer for every shape (the tiny build's), so one data set and one order: caldpo's
        # order comes from a tiny model of that tokenizer on the CPU (loading a 2.8B model for it is slow).
        order_model = build_random(tmp / "order_model", vocab=512, hidden_size=64, num_layers=2, num_heads=4)
        from transformers import AutoTokenizer
        n_train = args.pairs * (args.steps + args.warmup) + 8
        report["data_words"] = synthesize_hh(args.data_dir, n_train, 8, AutoTokenizer.from_pretrained(order_model),
                                             args.max_length)
        order_args = argparse.Namespace(**{**vars(args), "model_dir": order_model, "out_json": args.order,
                                           "device": "cpu"})
        worker_order(order_args)
        for shape in shapes:
            spec = GPU_SHAPES[shape]
            todo = [(who, layout, attn, column_key(shape, who, layout, attn)) for who, layout, attn in columns]
            build_s = max((b["seconds"] for b in report["builds"].values()), default=20.0 if cuda else 0.0)
            if left() < min_column_s + build_s:  # the build and at least one column
                for who, layout, attn, key in todo:
                    record(key, shape, who, layout, attn, {"status": "skipped", "reason":
                           f"time box: {max(left(), 0):.0f} s left of {args.budget_s:.0f} s, the model build and "
                           f"a column need about {min_column_s + build_s:.0f} s"})
                continue
            t = time.monotonic()
            try:
                args.model_dir = build_random(tmp / shape, vocab=spec["vocab"], hidden_size=spec["hidden"],
                                              num_layers=spec["layers"], num_heads=spec["heads"], device=args.device,
                                              dtype="bfloat16" if cuda else "float32")
                report["builds"][shape] = {"seconds": time.monotonic() - t, "params": _count_params(args.model_dir)}
            except Exception as e:  # noqa: BLE001 (the build's failure is this shape's result)
                for who, layout, attn, key in todo:
                    record(key, shape, who, layout, attn, {"status": "oom" if _is_oom(e) else "error",
                                                           "reason": f"model build: {type(e).__name__}: {e}"})
                continue
            took: list[float] = []
            for who, layout, attn, key in todo:
                if who == "trl" and trl_missing:
                    record(key, shape, who, layout, attn, {"status": "missing", "reason": trl_missing})
                    continue
                need = max(took) if took else min_column_s
                if not args.dry_run and left() < need + 5:
                    record(key, shape, who, layout, attn, {"status": "skipped", "reason":
                           f"time box: {max(left(), 0):.0f} s left of {args.budget_s:.0f} s, a column of this shape "
                           + (f"took {need:.0f} s" if took else f"needs about {need:.0f} s")})
                    continue
                extra = {"loss": "caldpo" if who == "caldpo" else "dpo", "attn": attn}
                if layout:
                    extra["layout"] = layout
                t = time.monotonic()
                try:
                    run = _spawn(args, who, tmp / f"{key.replace('/', '_')}.json",
                                 timeout=None if args.dry_run else max(left() - 3, 1), **extra)
                except subprocess.TimeoutExpired:
                    run = {"status": "timeout", "reason": f"stopped at the time box after {time.monotonic() - t:.0f} s"}
                except Exception as e:  # noqa: BLE001 (a failed column is a result; the others still run)
                    text = f"{type(e).__name__}: {e}"
                    run = {"status": "oom" if "OutOfMemoryError" in text or "out of memory" in text else "error",
                           "reason": text[-1500:] if "Traceback" in text else text[:1500]}
                    if args.dry_run:
                        import traceback
                        run["reason"] = traceback.format_exc()[-3000:]
                run.setdefault("process_seconds", time.monotonic() - t)
                took.append(time.monotonic() - t)
                record(key, shape, who, layout, attn, run)
            shutil.rmtree(args.model_dir, ignore_errors=True)  # 5.6 GB at 2.8B in bf16
    write()
    print(gpu_table(report))
    return report


def _count_params(model_dir: Path) -> int:
    """Parameters in a saved model's safetensors files (from their headers: no weights read)."""
    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--role", default="driver", choices=("driver", "order", "caldpo", "trl"))
    p.add_argument("--stage", default="cpu", choices=("cpu", "gpu"),
                   help="cpu: the CPU table (default) | gpu: Pythia-2.8B/1.4B shapes on one CUDA device, time-boxed")
    p.add_argument("--dry-run", action="store_true", help="cpu stage: 1 step each on a tiny model, no TRL; "
                   "gpu stage: the same code path on CPU, tiny shape, fp32, TRL when installed")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (cpu stage: 3; gpu stage: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (cpu stage: 5; gpu stage: 3)")
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
    p.add_argument("--dense-masks", action="store_true",
                   help="cpu stage: add DPO prefix_shared on dense 4D masks (model.attn_implementation=sdpa)")
    p.add_argument("--kernels", default=None, help="caldpo's kernels.backend (cpu stage: torch, pinned so that "
                   "every run uses the same head: auto may build the native extension mid-benchmark; "
                   "gpu stage: auto, the Triton head)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="TRL with its DPOConfig default gradient_checkpointing=True (default here: off, as caldpo)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: print only)")
    g = p.add_argument_group("gpu stage")
    g.add_argument("--shapes", default="pythia-2.8b,pythia-1.4b", help=f"in order, of {', '.join(GPU_SHAPES)}")
    g.add_argument("--columns", default=GPU_COLUMNS, help="per shape, in order: LAYOUT[:ATTENTION] (caldpo) or trl")
    g.add_argument("--budget-s", type=float, default=330.0, help="time box of the whole stage (seconds)")
    g.add_argument("--min-column-s", type=float, default=None,
                   help="time a column needs before any of its shape has run (default 45 on CUDA)")
    g.add_argument("--reference-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="both trainers' reference model on CUDA (the authors' Pythia configs: float16)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak FLOP/s for MFU where caldpo's table has none (e.g. a CPU dry run)")
    g.add_argument("--device", default=None, help="gpu stage: cuda (a dry run: cpu)")
    g.add_argument("--out-dir", type=Path, default=None, help="e2e_gpu.json and e2e_gpu.md go here")
    g.add_argument("--results-dir", type=Path, default=None,
                   help="also write them to RESULTS_DIR/<machine>_<yyyymmdd>/ (gpu_suite.sh: benchmarks/results)")
    for k in ("model-dir", "data-dir", "scratch", "order", "out-json", "loss", "layout", "attn"):
        p.add_argument(f"--{k}")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    gpu = args.stage == "gpu"
    args.device = args.device or ("cuda" if gpu and not args.dry_run else "cpu")
    args.kernels = args.kernels or ("auto" if gpu and args.device == "cuda" else "torch")
    args.steps = args.steps if args.steps is not None else (3 if gpu else 5)
    args.rounds = args.rounds if args.rounds is not None else (1 if gpu else 3)
    if args.role == "order":
        return worker_order(args)
    if args.role == "caldpo":
        return worker_caldpo(args)
    if args.role == "trl":
        return worker_trl(args)

    if gpu:
        return run_gpu_stage(args, argv)
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
        from caldpo.train.tiny import build_random
        args.model_dir = build_random(tmp / "model", vocab=args.vocab, hidden_size=args.hidden,
                                      num_layers=args.layers, num_heads=args.heads,
                                      max_position_embeddings=max(1024, 2 * args.max_length))
        n_train = args.pairs * (args.steps + args.warmup) + 8
        from transformers import AutoTokenizer
        data_stats = synthesize_hh(tmp / "data", n_train, 8, AutoTokenizer.from_pretrained(args.model_dir),
                                   args.max_length)
        args.data_dir = tmp / "data"
        args.order = tmp / "order.json"
        _spawn(args, "order", args.order)
        columns = [("dpo", "caldpo", "prefix_shared"), ("dpo", "caldpo", "padded")]
        if args.dense_masks:  # today's default (segments) against the dense-mask path it replaced
            columns.append(("dpo", "caldpo", "prefix_shared+sdpa"))
        if with_trl:
            columns.append(("dpo", "trl", None))
        columns += [("caldpo", "caldpo", "prefix_shared"), ("caldpo", "caldpo", "padded")]
        runs: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            for loss, who, layout in (columns if r % 2 == 0 else columns[::-1]):
                key = f"{loss}/{who}" + (f"/{layout}" if layout else "")
                out_json = tmp / f"{key.replace('/', '_')}_{r}.json"
                extra = {"loss": loss} if who == "trl" else {"loss": loss, "layout": layout.split("+")[0]}
                if layout and "+" in layout:
                    extra["attn"] = layout.split("+")[1]
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
