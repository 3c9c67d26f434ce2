"""MFU on useful work: token_work's counts by hand, FlopCount's formula and its docstring's worked example."""
from __future__ import annotations

import pytest
import torch

from caldpo.train.metrics import FlopCount, Throughput, token_work
from caldpo.train.model import count_matmul_params


def _pair(prompt, chosen, rejected):
    """Token lists: ``prompt`` ids, then each response (labels on the responses only)."""
    out = {}
    for side, resp in (("chosen", chosen), ("rejected", rejected)):
        out[f"{side}_input_ids"] = prompt + resp
        out[f"{side}_labels"] = [-100] * len(prompt) + resp
    return out


def test_token_work_by_hand():
    # prompt of 3, chosen of 2, rejected of 4 whose first token equals chosen's: shared prefix 4
    ex = _pair([5, 6, 7], [8, 9], [8, 1, 2, 3])
    w = token_work([ex], sft=False)
    assert w["useful_tokens"] == 4 + 1 + 3  # shared 4, chosen's last 1, rejected's last 3
    # chosen positions 1..5 attend to 1..5 keys; rejected's own 3 tokens at positions 5, 6, 7 (1-based)
    assert w["attention_context"] == (1 + 2 + 3 + 4 + 5) + (5 + 6 + 7)
    assert w["scored_tokens"] == 2 + 4
    sft = token_work([{"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3]}], sft=True)
    assert sft == {"useful_tokens": 3, "attention_context": 6, "scored_tokens": 2}
    # a prompt-only label at position 0 is never scored (nothing predicts it)
    assert token_work([_pair([], [4, 5], [6])], sft=False)["scored_tokens"] == 1 + 0


def test_flop_count_formula_and_worked_example():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                        intermediate_size=10240, rotary_pct=0.25, tie_word_embeddings=False)
    with torch.device("meta"):
        lm = GPTNeoXForCausalLM(cfg)
    n, layers, hidden, vocab = count_matmul_params(lm)
    head = hidden * vocab
    f = FlopCount(n - head, head, layers, hidden, reference=True)
    assert f.body_params == pytest.approx(2.52e9, rel=2e-3) and head == pytest.approx(1.29e8, rel=2e-3)
    ex = _pair(list(range(1, 201)), list(range(201, 301)), list(range(301, 381)))
    w = token_work([ex], sft=False)
    assert w == {"useful_tokens": 380, "attention_context": 45150 + 19240, "scored_tokens": 180}
    step = f.step_flops(**w)
    assert step == pytest.approx(7.93e12, rel=2e-3)
    assert step == 4 * 2 * (f.body_params * 380 + 2 * 32 * 2560 * 64390 + head * 180)
    assert 64 * step / 1.0 / 989e12 == pytest.approx(0.513, abs=2e-3)
    assert FlopCount(1, 0, 0, 0, reference=False).step_flops(10, 0, 0) == 3 * 2 * 10


def test_throughput_reports_useful_mfu():
    thr = Throughput(FlopCount(1000, 100, 2, 8, reference=True), torch.device("cpu"), world=2)
    thr.peak = 1e6
    thr.start()
    out = thr.stop(100, 80, 500, 40)
    dt = out["step_time"]
    assert out["tokens_per_second"] == pytest.approx(100 / dt) and out["useful_tokens_per_second"] == pytest.approx(80 / dt)
    assert out["mfu"] == pytest.approx(4 * 2 * (1000 * 80 + 2 * 2 * 8 * 500 + 100 * 40) / dt / 2e6)
