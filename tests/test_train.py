"""End-to-end trainer tests on the shipped sample with the tiny local model."""
from __future__ import annotations

import math

import pytest
import torch

from caldpo.train.config import ConfigError, load_config, validate
from conftest import TINY, read_metrics, run_train

SEED_SFT = ["model=pythia28", "datasets=[hh]", "loss=sft", "exp_name=sft_hh", "gradient_accumulation_steps=2",
            "batch_size=64", "eval_batch_size=32", "trainer=FSDPTrainer", "sample_during_eval=false",
            "model.fsdp_policy_mp=bfloat16"]


def test_seed_command_lines_compose(tmp_path, monkeypatch):
    from caldpo.train import config
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(config, "hub_reachable", lambda timeout=3.0: True)  # the hub check: tests/test_config.py
    archive = tmp_path / "LATEST" / "policy.pt"
    archive.parent.mkdir()
    torch.save({"step_idx": 0, "state": {}, "metrics": {}}, archive)
    cfg = load_config(SEED_SFT)
    validate(cfg, world_size=1)
    assert (cfg.model.name_or_path, cfg.loss.name, cfg.batch_size, cfg.trainer) == \
        ("EleutherAI/pythia-2.8b", "sft", 64, "FSDPTrainer")
    assert (cfg.lr, cfg.optimizer, cfg.warmup_steps, cfg.max_grad_norm) == (5e-7, "RMSprop", 150, 10.0)
    for data, beta in (("hh", 0.1), ("tldr", 0.001)):
        over = [o for o in SEED_SFT if not o.startswith(("loss=", "datasets="))]
        cfg = load_config(over + [f"datasets=[{data}]", "loss=caldpo", f"loss.beta={beta}", f"model.archive={archive}"])
        validate(cfg, world_size=4)
        assert cfg.loss.name == "caldpo" and cfg.loss.beta == beta and cfg.loss.calibration_weight == 1.0
        assert list(cfg.datasets) == [data]


@pytest.mark.parametrize("overrides, option", [
    (["datasets=[imdb]"], "datasets"),
    (["batch_size=6", "gradient_accumulation_steps=4"], "batch_size"),
    (["model.archive=/nonexistent/LATEST/policy.pt"], "model.archive"),
    (["loss=caldpo", "loss.beta=0"], "loss.beta"),
    (["trainer=DeepSpeed"], "trainer"),
    (["max_prompt_length=600"], "max_prompt_length"),
    (["data.paths.hh=/nonexistent"], "data.paths.hh"),
])
def test_bad_config_names_the_option(overrides, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        validate(load_config(overrides), world_size=1)


def test_world_size_divisibility():
    over = ["trainer=FSDPTrainer", "batch_size=8", "gradient_accumulation_steps=2", "eval_batch_size=6"]
    validate(load_config(over), world_size=2)
    with pytest.raises(ConfigError, match="world size"):
        validate(load_config(over), world_size=3)
    with pytest.raises(ConfigError, match="trainer=BasicTrainer"):
        validate(load_config(over[1:]), world_size=2)


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match="lr_typo"):
        load_config(["lr_typo=3"])
    with pytest.raises(ConfigError, match="beta"):
        load_config(["loss=sft", "loss.beta=0.1"])


def test_cli_config_error_exit_code(tmp_path):
    proc = run_train(["datasets=[imdb]", f"run_dir={tmp_path}"], check=False)
    assert proc.returncode == 2
    assert "datasets" in proc.stderr and "imdb" in proc.stderr


def test_sft_run_outputs(sft_run):
    from transformers import AutoModelForCausalLM
    blob = torch.load(sft_run / "LATEST" / "policy.pt", weights_only=True)
    assert set(blob) == {"step_idx", "state", "metrics"}
    assert blob["step_idx"] == 96  # examples seen, as the reference code's example_counter
    hf = AutoModelForCausalLM.from_pretrained(sft_run / "LATEST" / "hf")
    assert set(blob["state"]) == set(hf.state_dict())
    train = read_metrics(sft_run)
    assert [r["step"] for r in train] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) and r["tokens_per_second"] > 0 for r in train)
    evals = read_metrics(sft_run, "eval")
    assert evals[-1]["loss"] < evals[0]["loss"] - 5, "SFT should lower the eval NLL of chosen responses"
    assert (sft_run / "DONE").exists()


def test_checkpoint_round_trip(sft_run):
    """policy.pt loaded into a fresh model gives the same log-probs as the trained weights (HF export)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from caldpo.kernels import sequence_logprobs
    hf_dir = sft_run / "LATEST" / "hf"
    trained = AutoModelForCausalLM.from_pretrained(hf_dir)
    fresh = AutoModelForCausalLM.from_config(trained.config)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([tok("\n\nHuman: What is 2 plus 2?\n\nAssistant: 2 plus 2 is 4.")["input_ids"]])
    labels = ids.clone()
    labels[:, :8] = -100

    def logps(m):
        m.eval()
        with torch.no_grad():
            h = m.base_model(input_ids=ids).last_hidden_state
            return sequence_logprobs(h, m.get_output_embeddings().weight, labels, backend="reference")

    before = logps(fresh)
    fresh.load_state_dict(torch.load(sft_run / "LATEST" / "policy.pt", weights_only=True)["state"])
    assert not torch.allclose(before, logps(fresh))
    torch.testing.assert_close(logps(fresh), logps(trained), rtol=0, atol=0)


@pytest.mark.parametrize("loss, beta, expected", [
    # At step 1 the policy equals the reference (both loaded from the archive), so h_w = h_l = 0:
    ("dpo", 0.1, math.log(2)),                                  # -log sigmoid(0)
    ("ipo", 0.1, (1 / (2 * 0.1)) ** 2),                          # (0 - 1/(2 beta))^2
    ("caldpo", 0.25, math.log(2) + 2 * (1 / (2 * 0.25)) ** 2),   # -log sigmoid(0) + 2 (1/(2 beta))^2
])
def test_first_step_loss_equals_formula(sft_run, tmp_path, loss, beta, expected):
    run_train([*TINY, f"loss={loss}", f"loss.beta={beta}", f"model.archive={sft_run}/LATEST/policy.pt",
               f"run_dir={tmp_path}", "n_examples=16", "batch_size=8", "lr=1e-3", "do_first_eval=false",
               "export_hf=false"])
    first = read_metrics(tmp_path)[0]
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6)


def test_reference_free_keeps_the_reference_in_rewards_and_calibration(sft_run, tmp_path):
    """loss.reference_free as in the authors' code: the reference still runs and stays in h (at step 1 the
    policy equals it, so every reward and h is 0); only the sigmoid sees log pi(y_w) - log pi(y_l)."""
    run_train([*TINY, "loss=caldpo", "loss.beta=0.25", "loss.reference_free=true",
               f"model.archive={sft_run}/LATEST/policy.pt", f"run_dir={tmp_path}", "n_examples=2", "batch_size=1",
               "lr=1e-3", "do_first_eval=false", "export_hf=false"])
    first = read_metrics(tmp_path)[0]  # one pair: its own numbers, not a mean
    u = first["logps/chosen"] - first["logps/rejected"]
    assert abs(u) > 0.1
    for key in ("rewards/chosen", "rewards/rejected", "calibration/h_chosen", "calibration/h_rejected"):
        assert first[key] == pytest.approx(0, abs=1e-6), key
    preference = math.log1p(math.exp(-u)) if u > 0 else -u + math.log1p(math.exp(u))
    assert first["loss/preference"] == pytest.approx(preference, rel=1e-5, abs=1e-6)
    assert first["loss"] == pytest.approx(preference + 2 * (1 / (2 * 0.25)) ** 2, rel=1e-5)


def test_caldpo_learns_preferences(sft_run, tmp_path):
    """Cal-DPO from the SFT checkpoint: training-pair reward accuracy well above chance, chosen reward > 0."""
    run_train([*TINY, "loss=caldpo", "loss.beta=0.1", f"model.archive={sft_run}/LATEST/policy.pt",
               f"run_dir={tmp_path}", "n_examples=192", "batch_size=8", "lr=5e-4", "eval_every=1000",
               "export_hf=false"])
    train = read_metrics(tmp_path)
    late = train[-8:]
    acc = sum(r["rewards/accuracies"] for r in late) / len(late)
    chosen = sum(r["rewards/chosen"] for r in late) / len(late)
    # 64 pairs: chance is 0.5 +- 0.0625 (one s.d.), so 0.7 is over three s.d. above it.
    assert acc > 0.7, f"training reward accuracy {acc:.2f} not well above chance"
    assert chosen > 0, f"Cal-DPO should keep the chosen reward positive, got {chosen:.4f}"
    assert read_metrics(tmp_path, "eval")[-1]["rewards/accuracies"] > 0.75
    parts = train[-1]
    assert parts["loss"] == pytest.approx(parts["loss/preference"] + parts["loss/calibration"], rel=1e-4)


def test_generate_writes_prompt_response_reference(sft_run, tmp_path):
    import json
    import subprocess
    import sys
    from conftest import REPO
    from caldpo.train.data import load_dataset
    out = tmp_path / "samples.json"
    proc = subprocess.run([sys.executable, "-m", "caldpo.train.generate", *TINY,
                           f"model.archive={sft_run}/LATEST/policy.pt", "generate.n_prompts=5", "max_new_tokens=8",
                           f"generate.output={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    groups, _ = load_dataset("sample", "test", sft=True)
    expected = list(groups.values())[:5]
    assert [r["prompt"] for r in rows] == [g.prompt for g in expected]
    assert [r["reference"] for r in rows] == [g.sft_target for g in expected]
    assert all(isinstance(r["response"], str) for r in rows)
    assert any(r["response"].strip() for r in rows)


def test_eos_inside_data_is_rejected_at_load(tmp_path):
    import json
    bad = tmp_path / "hh.jsonl"
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: fine<|endoftext|>", "rejected": "\n\nHuman: hi\n\nAssistant: no"}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_train([*TINY, f"data.paths.sample={bad}", f"run_dir={tmp_path / 'r'}"], check=False)
    assert proc.returncode == 2
    assert "EOS" in proc.stderr and "chosen" in proc.stderr


def test_rerun_of_finished_run_changes_nothing(sft_run):
    before = (sft_run / "metrics.jsonl").read_text()
    same = [*TINY, "loss=sft", f"run_dir={sft_run}", "n_examples=96", "batch_size=8", "lr=2e-3",
            "optimizer=AdamW", "eval_every=1000"]  # the sft_run fixture's command
    proc = run_train(same)
    assert "already finished" in proc.stderr
    assert (sft_run / "metrics.jsonl").read_text() == before
    proc = run_train([*same, "resume=never"], check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr


def test_resume_with_another_optimizer_is_a_clear_error(tmp_path):
    args = [*TINY, "loss=sft", f"run_dir={tmp_path}", "n_examples=64", "batch_size=8", "optimizer=AdamW"]
    (tmp_path).mkdir(exist_ok=True)
    (tmp_path / "STOP").touch()
    assert run_train(args, check=False).returncode == 75  # stopped after step 1 with a resume checkpoint
    proc = run_train([*args[:-1], "optimizer=RMSprop"], check=False)
    assert proc.returncode == 2 and "other training options" in proc.stderr and "optimizer: AdamW -> RMSprop" in proc.stderr
