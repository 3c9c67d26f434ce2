"""The end-to-end throughput benchmark runs both heads through the real trainer and reports figures."""
import json
import subprocess
import sys

from conftest import REPO


def test_bench_train_reports_both_heads(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--hidden", "32", "--layers", "1",
                           "--vocab", "2048", "--steps", "3", "--warmup", "1", "--batch-size", "4",
                           "--max-length", "64", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for head in ("auto", "reference"):
        assert "error" not in res[head], res[head]
        assert res[head]["tokens_per_second"] > 0 and res[head]["steps_timed"] == 2
    assert "fused / materialised throughput" in proc.stdout
