"""The log-prob + loss micro-benchmark: its harness, its quick CPU run, the GPU suite's syntax."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench_logprob_loss.py")
METHODS = ("ours", "naive", "liger_dpo", "cce", "torch_lce")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_logprob_loss", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.mark.parametrize("script", ["gpu_suite.sh", "fetch_wheels.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", script)], check=True)


def test_gpu_suite_cpu_dry_run(tmp_path):
    """The GPU suite's plumbing on CPU (DEVICE=cpu): its default stages run in order within the budget
    given on the command line (env, attention, e2e, tests), every result lands under $OUT (at most 8 files,
    what a lent machine returns), and the tables are printed last."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, DEVICE="cpu", OMP_NUM_THREADS="1",
               TESTS="tests/test_benchmarks.py", TEST_ARGS="-k parse_shape")
    env.pop("SUITE_BUDGET_S", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--budget", "200"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    log = (out / "suite.log").read_text()
    order = [log.index(f"== {name}: rc=0") for name in ("env", "attention", "e2e", "tests tests/test_benchmarks.py")]
    assert order == sorted(order) and "200s budget" in log and "1 passed" in log
    info = json.loads((out / "env.json").read_text())
    assert info["torch"] and "varlen_signature" in info and info["varlen_unavailable"]  # CPU: the kernel cannot run
    att = json.loads((out / "attention.json").read_text())
    assert set(att["results"]) == {"padded/mask", "padded/no-mask", "prefix_shared/mask", "prefix_shared/segments"}
    e2e = json.loads((out / "e2e_gpu.json").read_text())
    assert e2e["dry_run"] and e2e["results"]["tiny/caldpo/prefix_shared+varlen"]["status"] == "ok"
    assert (out / "e2e_gpu.md").read_text() in proc.stdout and (out / "attention.md").read_text() in proc.stdout
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["attention.json", "attention.md", "e2e_gpu.json", "e2e_gpu.md", "env.json", "suite.log"]
    assert not (tmp_path / "benchmarks").exists()


def test_gpu_suite_budget_spent(tmp_path):
    """A budget too small for anything: every stage says it was skipped, and the suite fails."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, DEVICE="cpu", STAGES="attention e2e")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--budget", "5"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    log = (out / "suite.log").read_text()
    assert proc.returncode != 0 and "== attention: skipped (suite budget spent)" in log
    assert "== e2e: skipped (suite budget spent)" in log


def test_parse_shape(bench):
    assert [s.name for s in bench.parse_shape("cpu")] == ["cpu-s", "cpu-m"]
    s = bench.parse_shape("2x64x32x512")[0]
    assert (s.pairs, s.seq, s.hidden, s.vocab, s.tokens) == (2, 64, 32, 512, 256)
    with pytest.raises(SystemExit):
        bench.parse_shape("nonsense")


@pytest.mark.parametrize("kind", ["caldpo", "dpo"])
def test_reference64_matches_autograd(bench, kind):
    """The chunked float64 reference equals plain float64 autograd through materialised logits."""
    shape = bench.Shape("t", 3, 17, 8, 37)
    inp = bench.make_inputs(shape, torch.device("cpu"), torch.float64, torch.Generator().manual_seed(1))
    ref = bench.reference64(inp, kind, chunk_tokens=7)
    pol = bench._naive_seq_logps(inp["hidden"], inp["weight"], inp["labels"])
    with torch.no_grad():
        rpol = bench._naive_seq_logps(inp["ref_hidden"], inp["ref_weight"], inp["labels"])
    p = shape.pairs
    loss = bench.LOSS_FNS[kind](pol[:p], pol[p:], rpol[:p], rpol[p:]).mean()
    loss.backward()
    assert bench.rel_err(ref["loss"], loss) < 1e-12
    assert bench.rel_err(ref["logps"], pol) < 1e-12
    assert bench.rel_err(ref["grad_hidden"], inp["hidden"].grad) < 1e-10
    assert bench.rel_err(ref["grad_weight"], inp["weight"].grad) < 1e-10


def test_inputs_half_prompt(bench):
    shape = bench.Shape("t", 4, 100, 8, 50)
    inp = bench.make_inputs(shape, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
    frac = (inp["labels"] == bench.IGNORE).float().mean().item()
    assert 0.35 <= frac <= 0.65
    p = shape.pairs
    assert torch.equal(inp["labels"][:p] == bench.IGNORE, inp["labels"][p:] == bench.IGNORE)


def test_cpu_peak_bytes_counts_tensors(bench):
    def fn():
        a = torch.ones(1 << 20)  # 4 MiB
        b = a * 2  # 4 MiB more
        del a
        return float(b[0])
    out, peak = bench.cpu_peak_bytes(fn)
    assert out == 2.0
    assert 8 << 20 <= peak < 9 << 20


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--device", "cpu", "--json", str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(path) as f:
        return json.load(f), proc.stdout


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_json_has_every_method(quick_run):
    res, stdout = quick_run
    assert res["device"] == "cpu" and res["env"]["torch"] == torch.__version__
    assert res["env"]["device_name"] and res["shapes"]
    for sr in res["shapes"]:
        assert sr["scored_tokens"] > 0 and _finite(sr["matmul_flops_per_s"])
        assert set(METHODS) <= set(sr["methods"])
        for name in METHODS:
            e = sr["methods"][name]
            if name in ("ours", "naive"):
                assert e["status"] == "ok", e
            if e["status"] != "ok":
                assert e["status"] in ("missing", "error") and e["reason"], e
                if e["status"] == "error":
                    warnings.warn(f"benchmark peer {name} failed: {e['reason']}")
                continue
            assert _finite(e["time_s"]) and e["time_s"] > 0
            assert len(e["times_s"]) == res["reps"]
            assert isinstance(e["peak_mem_bytes"], int) and e["peak_mem_bytes"] > 0
            assert _finite(e["flops_per_s"]) and _finite(e["time_vs_ours"])
            for key in ("loss", "logps", "grad_hidden", "grad_weight"):
                assert _finite(e["err"][key]), (name, key, e["err"])
    # The table comes last and names every method.
    table = stdout[stdout.rindex("\n# "):]
    for name in METHODS:
        assert name in table


def test_quick_methods_compute_the_same_thing(quick_run):
    """Every method that ran matches float64 on the same inputs (fp32 on CPU)."""
    res, _ = quick_run
    for sr in res["shapes"]:
        ms = sr["methods"]
        ours, naive = ms["ours"], ms["naive"]
        assert abs(ours["loss"] - naive["loss"]) <= 1e-4 * abs(naive["loss"])
        assert abs(ours["loss"] - sr["reference_loss"]["caldpo"]) <= 1e-4 * abs(sr["reference_loss"]["caldpo"])
        for name, e in ms.items():
            if e["status"] != "ok":
                continue
            assert e["err"]["logps"] < 1e-5, (name, e["err"])
            assert e["err"]["loss"] < 1e-3, (name, e["err"])
            assert e["err"]["grad_hidden"] < 1e-3 and e["err"]["grad_weight"] < 1e-3, (name, e["err"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_profile_head_imports_and_refuses_cpu():
    """The CUDA-only head profile loads (imports, argument parsing) and says why it cannot run here."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile_head.py"), "--reps", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr, proc.stderr[-2000:]


def test_e2e_cpu_dry_run(tmp_path):
    """benchmarks/bench_e2e.py --dry-run: one step per column on a tiny model (no TRL); the layouts
    see the same batches (same tokens counted, same first-step loss) and prefix sharing runs fewer
    backbone tokens than the padded rows."""
    out = tmp_path / "e2e.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_e2e.py"), "--dry-run", "--out", str(out)],
                   check=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    res = report["results"]
    assert set(res) == {"dpo/caldpo/prefix_shared", "dpo/caldpo/padded",
                        "caldpo/caldpo/prefix_shared", "caldpo/caldpo/padded"}
    for loss in ("dpo", "caldpo"):
        ps, pad = res[f"{loss}/caldpo/prefix_shared"], res[f"{loss}/caldpo/padded"]
        assert ps["tokens_per_step"] == pad["tokens_per_step"] > 0
        assert ps["backbone_tokens_per_step"] < pad["backbone_tokens_per_step"]
        assert ps["first_step_loss"] == pytest.approx(pad["first_step_loss"], rel=1e-5)
        assert ps["tokens_per_second"] > 0 and ps["peak_rss_mib"] > 0
    assert "lscpu" in report["machine"] or report["machine"]["cpus"]


# ----------------------------------------------------------------------------- bench_e2e.py --stage gpu

E2E = os.path.join(ROOT, "benchmarks", "bench_e2e.py")


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e", E2E)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _neox_matmul_params(hidden, layers, vocab):
    """GPT-NeoX's parameters without the input embedding: per layer two LayerNorms (4H), QKV (3H^2 + 3H),
    the attention output (H^2 + H) and the FFN (4H^2 + 4H, 4H^2 + H); the final LayerNorm (2H); the head (VH)."""
    h = hidden
    return layers * (4 * h + 3 * h * h + 3 * h + h * h + h + 4 * h * h + 4 * h + 4 * h * h + h) + 2 * h + vocab * h


def _trl_installed():
    return all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets", "accelerate"))


def test_e2e_gpu_stage_dry_run(tmp_path):
    """bench_e2e.py --stage gpu --dry-run: the GPU stage's code path on CPU (tiny Pythia shape, fp32,
    FSDPTrainer in one process, both caldpo layouts, TRL when installed). Every column has finite
    tokens/s; the layouts see the same batches (same counted tokens, same step-1 loss and log-probs,
    same step-2 loss after one RMSprop update); MFU follows Throughput's formula, recomputed here from
    an independent count of GPT-NeoX's parameters."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, E2E, "--stage", "gpu", "--dry-run", "--out-dir", str(out),
                           "--peak-tflops", "0.5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "e2e_gpu.json").read_text())
    res, runs = report["results"], report["runs"]
    PS = "tiny/caldpo/prefix_shared+varlen"
    assert list(res) == [PS, "tiny/caldpo/padded", "tiny/trl"]
    st = report["settings"]
    pairs, warmup = st["pairs"], st["warmup"]
    assert st["device"] == "cpu" and st["steps"] >= 1 and warmup >= 1
    head = 512 * 64
    body = _neox_matmul_params(64, 2, 512) - head
    ran = [PS, "tiny/caldpo/padded"]
    if _trl_installed():
        ran.append("tiny/trl")
    else:
        assert res["tiny/trl"]["status"] == "missing" and "not installed" in res["tiny/trl"]["reason"]
    for key in ran:
        r, run = res[key], runs[key]
        assert r["status"] == "ok", (key, r.get("reason"))
        assert _finite(r["tokens_per_second"]) and r["tokens_per_second"] > 0
        assert r["peak_rss_mib"] > 0 and r["peak_gpu_mib"] is None  # CPU: no GPU memory
        assert (r["body_params"], r["head_params"], run["with_reference"]) == (body, head, True)
        assert run["sequences"] == [2.0 * pairs] * len(run["sequences"])
        timed = slice(warmup, None)
        secs, toks = run["step_seconds"][timed], run["tokens"][timed]
        assert r["tokens_per_second"] == pytest.approx(sum(toks) / sum(secs), rel=1e-12)
        # MFU on useful work: 4 passes (policy forward + backward, reference forward) of
        # 2 x (body x useful tokens + 2 x layers x hidden x attention context + head x scored tokens)
        flops = sum(4 * 2.0 * (body * u + 2 * 2 * 64 * c + head * n) for u, c, n in
                    zip(run["useful_tokens"][timed], run["attention_context"][timed], run["scored_tokens"][timed]))
        assert r["mfu"] == pytest.approx(flops / sum(secs) / 0.5e12, rel=1e-6), key
        assert all(0 < n < t for n, t in zip(run["scored_tokens"], run["tokens"]))
    # the same work counted for every column; prefix sharing runs exactly the useful tokens
    for k in ("tokens", "useful_tokens", "attention_context", "scored_tokens"):
        assert all(runs[key][k] == runs[PS][k] for key in ran), k
    assert runs[PS]["useful_tokens"] == runs[PS]["backbone_tokens"]
    ps, pad = res[PS], res["tiny/caldpo/padded"]
    assert ps["tokens_per_step"] == pad["tokens_per_step"] > 0
    assert ps["backbone_tokens_per_step"] < pad["backbone_tokens_per_step"]
    assert ps["first_step_loss"] == pytest.approx(pad["first_step_loss"], rel=1e-4)
    rps, rpad = runs[PS], runs["tiny/caldpo/padded"]
    assert rps["tokens"] == rpad["tokens"]
    assert rps["logps"][0] == pytest.approx(rpad["logps"][0], rel=1e-5)  # fp32, summed over ~100 tokens
    # after one update the loss depends on log pi - log pi_ref, a difference of two sums of ~100 log-probs
    assert rps["loss"][1] == pytest.approx(rpad["loss"][1], rel=1e-4)
    assert rps["loss"][1] != rps["loss"][0]
    table = (out / "e2e_gpu.md").read_text()
    for row in ("| tiny | caldpo | caldpo | prefix_shared | varlen |", "| tiny | caldpo | caldpo | padded | sdpa |",
                "| tiny | trl | dpo | - | sdpa |"):
        assert row in table
    assert "TRL has no Cal-DPO" in table and "token count is checked equal" in table
    assert "prefix_shared / padded" in table and "Targets" in table
    assert proc.stdout.rstrip().endswith(table.rstrip())


def test_e2e_gpu_stage_time_box(tmp_path):
    """A time box already spent: every column is recorded as skipped with the reason; the files are written."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, E2E, "--stage", "gpu", "--dry-run", "--out-dir", str(out),
                           "--budget-s", "0", "--columns", "padded,trl"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "e2e_gpu.json").read_text())["results"]
    assert list(res) == ["tiny/caldpo/padded", "tiny/trl"]
    for r in res.values():
        assert r["status"] == "skipped" and r["reason"].startswith("time box"), r
    assert "skipped: time box" in (out / "e2e_gpu.md").read_text()


def test_e2e_worker_command_round_trip(e2e, tmp_path):
    """A worker process gets the driver's settings and its column's (the GPU stage spawns them; the dry
    run calls the workers in one process, so this is what checks the command line)."""
    args = e2e.build_parser().parse_args(["--stage", "gpu", "--reference-dtype", "float16", "--peak-tflops", "989",
                                          "--trl-gradient-checkpointing", "--kernels", "triton", "--pairs", "4"])
    args.model_dir, args.data_dir, args.scratch, args.order = tmp_path / "m", tmp_path / "d", tmp_path, tmp_path / "o"
    args.device, args.steps = "cuda", 3
    cmd = e2e.worker_command(args, "caldpo", tmp_path / "w.json", loss="caldpo", layout="prefix_shared",
                             attn="flex_attention")
    ns = e2e.build_parser().parse_args(cmd[2:])
    assert (ns.role, ns.stage, ns.device, ns.reference_dtype, ns.peak_tflops, ns.kernels) == \
        ("caldpo", "gpu", "cuda", "float16", 989.0, "triton")
    assert (ns.loss, ns.layout, ns.attn, ns.pairs, ns.steps, ns.out_json) == \
        ("caldpo", "prefix_shared", "flex_attention", 4, 3, str(tmp_path / "w.json"))
    assert ns.trl_gradient_checkpointing and ns.model_dir == str(tmp_path / "m")
    over = dict(o.split("=", 1) for o in e2e.caldpo_overrides(ns, tmp_path / "m", tmp_path / "d", "caldpo",
                                                               "padded", tmp_path / "r", **e2e.gpu_settings(ns, "sdpa")))
    assert (over["trainer"], over["device"], over["model.policy_dtype"], over["model.fsdp_policy_mp"],
            over["model.reference_dtype"], over["layout"], over["kernels.backend"]) == \
        ("FSDPTrainer", "cuda", "float32", "bfloat16", "float16", "padded", "triton")


def test_e2e_gpu_oom_is_a_result_and_targets(e2e):
    """Out of memory becomes a column's result (other errors raise); ratios and targets from given numbers."""
    import torch
    r = e2e._failed(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), torch.device("cpu"), None)
    assert r["status"] == "oom" and "Tried to allocate" in r["reason"]
    with pytest.raises(ValueError):
        e2e._failed(ValueError("other"), torch.device("cpu"), None)
    ok = {"status": "ok"}
    res = {"pythia-2.8b/caldpo/prefix_shared+varlen": {**ok, "tokens_per_second": 3000.0, "mfu": 0.42,
                                                       "peak_gpu_mib": 50.0},
           "pythia-2.8b/caldpo/padded": {**ok, "tokens_per_second": 2000.0, "mfu": 0.28},
           "pythia-2.8b/trl": {**ok, "tokens_per_second": 1250.0, "peak_gpu_mib": 80.0},
           "pythia-1.4b/caldpo/prefix_shared": {"status": "skipped", "reason": "time box"}}
    ratios = e2e.gpu_ratios(res, ["pythia-2.8b", "pythia-1.4b"])
    assert ratios == {"pythia-2.8b: caldpo prefix_shared / TRL": 2.4, "pythia-2.8b: caldpo padded / TRL": 1.6,
                      "pythia-2.8b: prefix_shared / padded": 1.5,
                      "pythia-2.8b: peak memory TRL / caldpo prefix_shared": 1.6}
    targets = e2e.gpu_targets(res, ratios, ["pythia-2.8b", "pythia-1.4b"])
    assert targets[0] == ("useful-work MFU >= 45% at pythia-2.8b (caldpo): prefix_shared+varlen 42.0%, "
                          "padded 28.0%: not met")
    assert targets[1] == ("caldpo >= 2x TRL tokens/s at pythia-2.8b: prefix_shared / TRL 2.40x (met), "
                          "padded / TRL 1.60x (not met)")
    assert targets[2] == "prefix_shared >= 1.8x padded tokens/s at pythia-2.8b: 1.50x (not met)"
    assert "not measured" in targets[3] and "not measured" in targets[4]


def test_bench_attention_quick(tmp_path):
    """bench_attention.py --quick: every attention path runs, finite, and agrees with padded/mask (fp32)."""
    out = tmp_path / "att.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_attention.py"), "--quick",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    assert list(res) == ["padded/mask", "padded/no-mask", "prefix_shared/mask", "prefix_shared/segments"]
    for path, r in res.items():
        assert r["finite"] and r["median_s"] > 0, path
        assert r["hidden_rel_err_vs_padded_mask"] < 1e-5, (path, r["hidden_rel_err_vs_padded_mask"])


def test_data_bench_dry_run(tmp_path):
    """benchmarks/bench_data.py --dry-run: a small HH folder, caldpo's cold run tokenizes both splits
    once, the warm run none; each run's time to the first step, CPU and peak RSS are measured; TRL
    is recorded as missing without a peer Python; the JSON and the table are written."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_data.py"), "--dry-run",
                           "--out-dir", str(out), "--name", "dry"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "dry.json").read_text())
    cold, warm = report["runs"]["caldpo cold"], report["runs"]["caldpo warm"]
    assert cold["tokenized_lines"] == 2 and warm["tokenized_lines"] == 0
    for run in (cold, warm):
        assert 0 < run["first_step_s"] < run["wall_s"] and run["cpu_s"] > 0 and run["peak_rss_mib"] > 100
    assert report["runs"]["TRL cold"]["status"] == "missing" and report["dry_run"]
    table = (out / "dry.md").read_text()
    assert "| caldpo warm | 1 |" in table and "missing: no --peer-python given" in table
