"""Data loading at the real Anthropic HH size: caldpo's cold and warm start to the first training step, in
1 and 2 processes, against TRL ``DPOTrainer``'s data preparation of the same pairs (CPU).

Every run is a process of its own, measured from the outside: wall time to the first training step
(the first train record in its ``metrics.jsonl``, polled every 20 ms) and to its exit, CPU seconds
(user + system of the process and every process under it) and the peak RSS of its largest process
(``ru_maxrss`` of the waited-for children, through a one-line wrapper per run).

caldpo runs the command of issue 17 with its run and token cache folders in the scratch folder:

    python -m caldpo.train model=tiny datasets=[hh] data.paths.hh=DATA loss=dpo n_examples=16 batch_size=8

* ``cold``: an empty token cache (data.token_cache_dir), so the train and test splits are read and
  tokenized once and written; ``warm``: the same command again (a new run folder, the cache kept);
* ``2 procs``: ``torchrun --nproc_per_node=2`` (gloo, ``trainer=FSDPTrainer device=cpu``), cold then
  warm: rank 0 builds the cache while rank 1 waits, then both map it. The log lines saying a split was
  tokenized (rank 0's "tokenized ... once into", another rank's warning that it tokenized too, an
  unwritable cache's warning) count how many times a split was tokenized.

TRL (optional; ``--peer-python`` names a Python with ``trl`` installed, else TRL is recorded as
missing): ``DPOTrainer(...)`` built on the same train pairs as caldpo splits them (prompt, chosen,
rejected strings written to a JSON-lines file by caldpo's loader first, not timed), the same tiny
model and tokenizer, ``max_length`` 512, ``max_prompt_length`` 256 and ``truncation_mode`` keep_end
(those its ``DPOConfig`` has; TRL 1.16 has no ``max_prompt_length``), ``dataset_num_proc`` unset: the time from its process start until the trainer is built
(imports, model, ``datasets`` JSON load, its tokenization of every pair) and its peak RSS. ``cold``:
an empty ``datasets`` cache; ``warm``: the same again (``datasets`` reuses its cached map results).
TRL tokenizes the train split only; caldpo's runs tokenize train and test and then train two steps
with evaluations before and after.

    python benchmarks/bench_data.py --data DIR [--peer-python /path/to/venv/bin/python]
        [--results-dir benchmarks/results] [--name cpu_data_20261206] [--processes 1,2] [--scratch DIR]
    python benchmarks/bench_data.py --dry-run --out-dir DIR    # a small HH folder made here, 1 process (a test;
                                                               # TRL only with --peer-python)

A full-size folder: ``python ../shared/tools/make_hh_full_scale.py ../shared/realdata/hh_rlhf_sample.jsonl``
(run in an empty folder; 160,800 train and 8,552 test pairs from real rows).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = ["model=tiny", "datasets=[hh]", "loss=dpo", "n_examples=16", "batch_size=8"]

WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
with open(sys.argv[2], "w") as log:
    rc = subprocess.run(sys.argv[3:], stdout=log, stderr=subprocess.STDOUT).returncode
r = resource.getrusage(resource.RUSAGE_CHILDREN)
json.dump({"rc": rc, "wall_s": time.perf_counter() - t, "cpu_s": r.ru_utime + r.ru_stime, "user_s": r.ru_utime,
           "sys_s": r.ru_stime, "peak_rss_mib": r.ru_maxrss / 1024}, open(sys.argv[1], "w"))
"""


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def measure(cmd: list[str], out_dir: Path, name: str, env: dict, first_step: Path | None = None,
            timeout: float = 3600) -> dict:
    """Run ``cmd`` under the wrapper; with ``first_step`` (a metrics.jsonl) also the time until its first
    train record. Raises RuntimeError with the log's tail when the command fails."""
    stats, log = out_dir / f"{name}.stats.json", out_dir / f"{name}.log"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(stats), str(log), *cmd], cwd=REPO, env=env)
    first = None
    while proc.poll() is None:
        if first is None and first_step is not None and first_step.exists():
            try:
                lines = first_step.read_text().splitlines()
            except OSError:
                lines = []
            if any('"split": "train"' in ln and '"loss"' in ln for ln in lines):
                first = time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"{name}: no exit after {timeout} s")
        time.sleep(0.02)
    out = json.loads(stats.read_text())
    text = log.read_text(errors="replace")
    if out["rc"] != 0:
        raise RuntimeError(f"{name} failed (exit {out['rc']}):\n{text[-4000:]}")
    out["first_step_s"] = first
    out["tokenized_lines"] = sum(("tokenized hh/" in ln and " once into " in ln) or "tokenized it on this rank too" in ln
                                 or "without caching it" in ln for ln in text.splitlines())
    out["log"] = str(log)
    return out


def caldpo_run(args, name: str, processes: int, cache: Path, scratch: Path, env: dict) -> dict:
    run_dir = scratch / "runs" / name
    over = [*COMMAND, f"data.paths.hh={args.data}", f"run_dir={run_dir}", f"data.token_cache_dir={cache}",
            *args.extra]
    if processes == 1:
        cmd = [sys.executable, "-m", "caldpo.train", *over]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--standalone",
               "-m", "caldpo.train", *over, "trainer=FSDPTrainer", "device=cpu"]
    res = measure(cmd, scratch, name, env, first_step=run_dir / "metrics.jsonl")
    res.update(command=" ".join(["python -m caldpo.train" if processes == 1 else
                                 f"torchrun --nproc_per_node={processes} -m caldpo.train", *over[:5],
                                 "data.paths.hh=DATA", *([] if processes == 1 else ["trainer=FSDPTrainer", "device=cpu"])]),
               processes=processes)
    return res


def export_pairs(data: str, out: Path) -> int:
    """The train pairs as caldpo splits them (prompt, chosen, rejected), one JSON object per line."""
    from caldpo.train.batches import flatten
    from caldpo.train.data import load_dataset

    groups, _ = load_dataset("hh", "train", path=data)
    n = 0
    with open(out, "w") as f:
        for ex in flatten(groups, sft=False):
            f.write(json.dumps({"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected}) + "\n")
            n += 1
    return n


def worker_trl(args) -> None:
    """Build TRL's DPOTrainer on the exported pairs; write what it took (run under the peer's Python)."""
    t0 = time.perf_counter()
    import dataclasses
    import resource

    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    # HH's truncation as caldpo's (keep_end); TRL drops no pair with it
    options = {k: v for k, v in {"max_length": 512, "max_prompt_length": 256, "truncation_mode": "keep_end"}.items()
               if k in fields}
    cfg = DPOConfig(output_dir=str(Path(args.scratch) / f"trl_out_{os.getpid()}"), per_device_train_batch_size=8,
                    use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no", disable_tqdm=True,
                    precompute_ref_log_probs=False, **options)
    t_ds = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=args.pairs, split="train", cache_dir=args.hf_cache)
    t_prep = time.perf_counter()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    t_end = time.perf_counter()
    Path(args.out_json).write_text(json.dumps({
        "trl": trl.__version__, "datasets": datasets.__version__, "pairs": len(trainer.train_dataset),
        "columns": list(trainer.train_dataset.column_names), "config": options,
        "setup_s": t_ds - t0, "json_load_s": t_prep - t_ds, "tokenize_s": t_end - t_prep, "ready_s": t_end - t0,
        "self_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def trl_run(args, name: str, pairs: Path, model_dir: Path, hf_cache: Path, scratch: Path, env: dict) -> dict:
    out_json = scratch / f"{name}.result.json"
    cmd = [args.peer_python, str(Path(__file__).resolve()), "--role", "trl", "--out-json", str(out_json),
           "--pairs", str(pairs), "--model-dir", str(model_dir), "--hf-cache", str(hf_cache),
           "--scratch", str(scratch)]
    res = measure(cmd, scratch, name, env)
    res.update(json.loads(out_json.read_text()))
    res["first_step_s"] = res["ready_s"]  # the trainer is built: its data is prepared
    return res


def peer_missing(python: str | None) -> str | None:
    if not python:
        return "no --peer-python given"
    proc = subprocess.run([python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    return None if proc.returncode == 0 else f"trl does not import with {python}: {proc.stderr.strip()[-200:]}"


def make_small_hh(out: Path, n_train: int, n_test: int) -> Path:
    """An HH folder from the real rows shipped in tests/data/realdata, each first human turn made unique
    (as ../shared/tools/make_hh_full_scale.py does at full size)."""
    rows = [json.loads(ln) for ln in (REPO / "tests" / "data" / "realdata" / "hh_rlhf_sample.jsonl").open()]
    rng = random.Random(0)
    words = "the of and to in is you that it for was on are as with".split()
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", n_train), ("test.jsonl", n_test)):
        with open(out / name, "w") as f:
            for i in range(n):
                r = rows[i % len(rows)]
                tag = " ".join(rng.choice(words) for _ in range(3))
                k = r["chosen"].find("\n\nHuman: ") + len("\n\nHuman: ")
                f.write(json.dumps({"chosen": r["chosen"][:k] + f"[{i} {tag}] " + r["chosen"][k:],
                                    "rejected": r["rejected"][:k] + f"[{i} {tag}] " + r["rejected"][k:]}) + "\n")
    return out


def table(report: dict) -> str:
    rows = report["runs"]
    lines = [f"`{report['command']}` (DATA: {report['data']}; {report['train_rows']} train rows), commit "
             f"{report['commit']}, {report['machine']['cpus']} CPUs; load average before "
             f"{report['loadavg_before']}, after {report['loadavg_after']}"
             + ("; other processes shared the CPUs" if report["shared_machine"] else ""), "",
             "| run | processes | to first step / data ready (s) | total (s) | CPU (s) | peak RSS, largest process (MiB) "
             "| splits tokenized |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if r.get("status") == "missing":
            lines.append(f"| {name} | - | missing: {r['reason']} | | | | |")
            continue
        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else "-"
        lines.append(f"| {name} | {r.get('processes', 1)} | {first} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {r.get('tokenized_lines', '-')} |")
    if report.get("ratios"):
        lines += ["", *[f"- {k}: {v:.2f}x" for k, v in report["ratios"].items()]]
    if report.get("targets"):
        lines += ["", "Targets (issue 17):", *[f"- {t}" for t in report["targets"]]]
    return "\n".join(lines) + "\n"


def targets(runs: dict) -> list[str]:
    out = []

    def check(label, ok):
        out.append(f"{label}: {'met' if ok else 'NOT met'}")

    if "caldpo cold" in runs:
        c = runs["caldpo cold"]
        check(f"cold start to the first step <= 90 s ({c['first_step_s']:.1f} s)", c["first_step_s"] <= 90)
        check(f"peak RSS of one process <= 2048 MiB ({c['peak_rss_mib']:.0f} MiB)", c["peak_rss_mib"] <= 2048)
    if "caldpo warm" in runs:
        w = runs["caldpo warm"]
        check(f"warm start to the first step <= 10 s ({w['first_step_s']:.1f} s)", w["first_step_s"] <= 10)
    if "caldpo cold, 2 procs" in runs:
        r = runs["caldpo cold, 2 procs"]
        check(f"2 processes tokenize each split once ({r['tokenized_lines']} lines for 2 splits)",
              r["tokenized_lines"] == 2)
    trl = runs.get("TRL cold")
    if trl and trl.get("status") != "missing" and "caldpo cold" in runs:
        c = runs["caldpo cold"]
        check(f"ahead of TRL's data preparation in time ({c['first_step_s']:.1f} s to the first step vs "
              f"{trl['ready_s']:.1f} s to data ready)", c["first_step_s"] < trl["ready_s"])
        check(f"ahead of TRL in memory ({c['peak_rss_mib']:.0f} vs {trl['peak_rss_mib']:.0f} MiB)",
              c["peak_rss_mib"] < trl["peak_rss_mib"])
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--role", default="driver", choices=("driver", "trl"))
    p.add_argument("--data", help="HH folder (train.jsonl, test.jsonl)")
    p.add_argument("--peer-python", default=None, help="a Python with trl installed (TRL column; else missing)")
    p.add_argument("--processes", default="1,2", help="process counts to run caldpo with")
    p.add_argument("--results-dir", default=None, help="write <name>.json and <name>.md here")
    p.add_argument("--name", default="cpu_data_20261206")
    p.add_argument("--scratch", default=None, help="folder for runs, caches and logs (default: a temporary one)")
    p.add_argument("--dry-run", action="store_true", help="a small HH folder made here, 1 process")
    p.add_argument("--out-dir", default=None, help="dry run: where its JSON and table go")
    p.add_argument("--extra", nargs="*", default=[], help="more caldpo overrides")
    p.add_argument("--out-json"), p.add_argument("--pairs"), p.add_argument("--model-dir"), p.add_argument("--hf-cache")
    args = p.parse_args(argv)
    if args.role == "trl":
        worker_trl(args)
        return {}
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench_data_"))
    scratch.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        args.data = str(make_small_hh(scratch / "hh_small", 400, 40))
        args.processes = "1"
        args.extra = [*args.extra, "n_eval_examples=16", "eval_batch_size=8", "export_hf=false"]
    if not args.data:
        p.error("--data DIR is required (or --dry-run)")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [x for x in [os.environ.get("PYTHONPATH")] if x])}
    env.pop("TOKENIZERS_PARALLELISM", None)  # the library's default, as a user runs it
    before = loadavg()
    runs: dict[str, dict] = {}
    for n in (int(x) for x in args.processes.split(",")):
        cache = scratch / f"token_cache_{n}"
        shutil.rmtree(cache, ignore_errors=True)
        suffix = "" if n == 1 else f", {n} procs"
        for phase in ("cold", "warm"):
            name = f"caldpo {phase}{suffix}"
            print(f"[bench_data] {name} ...", flush=True)
            runs[name] = caldpo_run(args, name.replace(" ", "_").replace(",", ""), n, cache, scratch, env)
    missing = peer_missing(args.peer_python)
    pairs = 0
    if missing is None:
        from caldpo.train.tiny import tiny_model_dir

        pairs_file = scratch / "pairs.jsonl"
        pairs = export_pairs(args.data, pairs_file)
        hf_cache = scratch / "hf_datasets"
        shutil.rmtree(hf_cache, ignore_errors=True)
        for phase in ("cold", "warm"):
            print(f"[bench_data] TRL {phase} ...", flush=True)
            runs[f"TRL {phase}"] = trl_run(args, f"trl_{phase}", pairs_file, tiny_model_dir(), hf_cache, scratch,
                                           {**env, "TRANSFORMERS_VERBOSITY": "error"})
    else:
        runs["TRL cold"] = {"status": "missing", "reason": missing}
    after = loadavg()
    ratios = {}
    trl = runs.get("TRL cold", {})
    if trl.get("status") != "missing" and "caldpo cold" in runs:
        c = runs["caldpo cold"]
        ratios["TRL data ready / caldpo cold first step (time)"] = trl["ready_s"] / c["first_step_s"]
        ratios["TRL peak RSS / caldpo cold peak RSS"] = trl["peak_rss_mib"] / c["peak_rss_mib"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    train_rows = sum(1 for _ in open(Path(args.data) / "train.jsonl"))
    report = {"command": "python -m caldpo.train " + " ".join(COMMAND[:3]) + " data.paths.hh=DATA "
                         + " ".join(COMMAND[3:]), "data": args.data, "train_rows": train_rows,
              "trl_pairs": pairs or None, "commit": commit,
              "dry_run": args.dry_run, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                   "python": platform.python_version()},
              "loadavg_before": before, "loadavg_after": after,
              "shared_machine": max(before + after, default=0) > 0.5, "runs": runs, "ratios": ratios,
              "targets": targets(runs)}
    text = table(report)
    print(text, flush=True)
    out_dir = Path(args.out_dir) if args.dry_run and args.out_dir else (Path(args.results_dir) if args.results_dir else None)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=1))
        (out_dir / f"{args.name}.md").write_text(text)
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
