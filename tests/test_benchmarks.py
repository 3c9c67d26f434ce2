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
    """The GPU suite's plumbing on CPU: its stages run in order within the budget, the test
    stage runs pytest, and the benchmark leaves its JSON and the table printed last."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, DEVICE="cpu", SHAPES="tiny",
               TESTS="tests/test_benchmarks.py", TEST_ARGS="-k parse_shape", SUITE_BUDGET_S="150",
               BENCH_ARGS="--reps 2")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    log = (out / "suite.log").read_text()
    assert "== kernel tests tests/test_benchmarks.py: rc=0" in log and "1 passed" in log
    result = json.loads((out / "gpu_results.json").read_text())
    assert [s["shape"]["name"] for s in result["shapes"]] == ["tiny"]
    table = (out / "gpu_table.txt").read_text()
    assert table.startswith("# ") and "\nours " in table
    assert proc.stdout.rstrip().endswith(table.rstrip())


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
