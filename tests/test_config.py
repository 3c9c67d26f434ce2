"""The typed config: schema covers every yaml key, unknown keys are errors, one preflight, run identity."""
from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from caldpo.train import config as C
from caldpo.train.__main__ import cli
from caldpo.train.config import ConfigError, load_config, validate

CONF = Path(C.__file__).parent / "conf"


def schema_keys(schema) -> set[str]:
    out = set()
    for f in dataclasses.fields(schema):
        out.add(f.name)
        t = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if t is not None and dataclasses.is_dataclass(t):
            out |= {f"{f.name}.{k}" for k in schema_keys(t)}
    return out


def yaml_keys(node, prefix="") -> set[str]:
    out = set()
    for k, v in node.items():
        if k == "defaults" and not prefix:
            continue
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= yaml_keys(v, f"{prefix}{k}.")
    return out


@pytest.mark.parametrize("group,schema", [("", C.Config), ("model", C.ModelConfig), ("loss", None)])
def test_every_yaml_key_is_in_the_schema(group, schema):
    """A key added to conf/*.yaml without its dataclass field fails here, by name."""
    files = [CONF / "config.yaml"] if not group else sorted((CONF / group).glob("*.yaml"))
    assert files
    for f in files:
        data = OmegaConf.to_container(OmegaConf.load(f))
        s = schema or C.LOSS_SCHEMAS[data["name"]]
        missing = yaml_keys(data) - schema_keys(s) - ({"model", "loss"} if not group else set())
        assert not missing, f"{f}: keys without a field in caldpo/train/config.py {s.__name__}: {sorted(missing)}"
        if group:  # a preset sets every field of its group (the dataclass holds no defaults)
            assert schema_keys(s) - {"defaults"} <= yaml_keys(data), f"{f}: fields without a default"


@pytest.mark.parametrize("override", [f"model={p}" for p in C.group_options("model")]
                         + [f"loss={p}" for p in C.group_options("loss")])
def test_every_preset_composes_typed(override):
    cfg = load_config([override])
    for node in (cfg, cfg.model, cfg.loss, cfg.data, cfg.generate):
        assert dataclasses.is_dataclass(OmegaConf.get_type(node))
    assert OmegaConf.get_type(cfg.loss) is C.LOSS_SCHEMAS[cfg.loss.name]


def test_unknown_keys_are_errors_naming_the_closest():
    cases = {
        ("loss=dpo", "+loss.shift=0.3"): "loss.shift is an option of loss=cal_dpo, not loss=dpo",
        ("+batchsize=64",): "did you mean batch_size?",
        ("batchsize=64",): "did you mean batch_size?",
        ("++batchsize=64",): "did you mean batch_size?",
        ("loss=caldpo", "loss.betta=0.2"): "did you mean loss.beta?",
        ("model.achive=x",): "did you mean model.archive?",
        ("loss=cal-dpo",): "did you mean loss=caldpo?",
        # the closest key of any loss, and which losses own it
        ("loss=sft", "los.beta=0.1"): "did you mean loss.beta? (loss=sft has no beta; dpo, ipo, caldpo, cal_dpo do)",
        ("loss=dpo", "loss.shfit=0.3"): "did you mean loss.shift? (loss=dpo has no shift; cal_dpo does)",
    }
    for overrides, hint in cases.items():
        with pytest.raises(ConfigError, match="unknown") as e:
            load_config(list(overrides))
        assert hint in str(e.value), (overrides, str(e.value))
    for override, takes in [("lr=fast", "a number"), ("batch_size=1.5", "a whole number"),
                            ("do_first_eval=maybe", "true or false"), ("loss=dpo loss.beta=abc", "a number")]:
        key = override.split()[-1].split("=")[0]
        with pytest.raises(ConfigError) as e:  # one short line: the override, the type its key takes
            load_config(override.split())
        assert str(e.value) == f"{override.split()[-1]}: {key} takes {takes}" + (" (e.g. 5e-7)" if takes == "a number" else "")
    cfg = load_config(["loss=cal_dpo", "loss.shift=0.3", "datasets=sample"])
    assert cfg.loss.shift == 0.3 and list(cfg.datasets) == ["sample"]
    assert list(load_config(["datasets=hh,sample"]).datasets) == ["hh", "sample"]


def test_choices_and_values_checked_by_the_preflight():
    for overrides, match in [(["optimizer=adam"], "optimizer=adam: choose one of RMSprop"),
                             (["loss=cal_dpo", "loss.shift=1.5"], "loss.shift=1.5"),
                             (["datasets=[hhh]"], "did you mean hh"),
                             (["exp_name=../x"], "exp_name"),
                             (["loss=caldpo", "loss.name=dpo"], "loss=dpo"),
                             (["batch_size=6", "gradient_accumulation_steps=4"], "not divisible")]:
        with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
            validate(load_config(["device=cpu", *overrides]), 1)
    for name in ("..", ".", "a/b"):
        with pytest.raises(ConfigError, match="a name, not a path"):
            validate(load_config(["device=cpu", f"exp_name={name}"]), 1)
    validate(load_config(["device=cpu", "exp_name=my..run"]), 1)  # dots inside a name are not a path


def test_fsdp_outside_torchrun_with_several_gpus_stops_with_the_torchrun_line(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    argv = ["model=tiny", "datasets=[sample]", "trainer=FSDPTrainer", "loss=sft"]
    with pytest.raises(ConfigError) as e:
        validate(load_config(argv), argv=argv)
    assert "torchrun --nproc_per_node=4 -m caldpo.train model=tiny 'datasets=[sample]' trainer=FSDPTrainer loss=sft" \
        in str(e.value)
    validate(load_config([*argv, "allow_one_gpu=true"]), argv=argv)  # the user's explicit choice
    validate(load_config(argv[:2]), argv=argv[:2])  # BasicTrainer is one process by definition
    monkeypatch.setenv("WORLD_SIZE", "4")  # under torchrun
    validate(load_config(argv), argv=argv)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("WORLD_SIZE")
    validate(load_config(argv), argv=argv)
    # The command line path: exit 2 before any work.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli(argv) == 2


def test_unreachable_hub_stops_in_seconds(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(ConfigError, match=r"model.name_or_path: 'EleutherAI/pythia-70m' is not a local path.*"
                                          r"HF_HUB_OFFLINE.*model.name_or_path=/path"):
        validate(load_config(["model=pythia70m", "device=cpu"]), 1)
    with pytest.raises(ConfigError, match=r"datasets=hh \(data.paths.hh\).*data.paths.hh=/path"):
        validate(load_config(["datasets=[hh]", "device=cpu"]), 1)
    # No offline flag, but nothing answers at the endpoint: the ~3 s probe says so.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(C, "_PROBE", {})
    with pytest.raises(ConfigError, match="unreachable"):
        validate(load_config(["datasets=[tldr]", "loss=dpo", "device=cpu"]), 1)
    assert time.time() - t < 10
    # Local paths need no hub.
    (tmp_path / "hh.jsonl").write_text("")
    validate(load_config(["datasets=[hh]", f"data.paths.hh={tmp_path / 'hh.jsonl'}", "device=cpu"]), 1)


def test_missing_logging_packages_fail_in_the_preflight(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "wandb")
                        else real(name, *a))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        validate(load_config(["tensorboard=true", "device=cpu"]), 1)
    with pytest.raises(ConfigError, match="pip install wandb"):
        validate(load_config(["wandb.enabled=true", "device=cpu"]), 1)


def test_run_identity_and_default_run_dir(tmp_path):
    base = ["device=cpu", f"local_run_root={tmp_path}", "exp_name=X"]
    d0 = C.run_dir(load_config(base))
    assert d0.parent == tmp_path and d0.name.startswith("X_") and len(d0.name) == 10
    # Options that do not change what trains keep the directory (a requeue may change them) ...
    for same in ("save_every=5", "keep_checkpoints=1", "wandb.enabled=true", "tensorboard=true", "resume=never",
                 "generate.n_prompts=3", "device=auto", "trainer=FSDPTrainer", "minimum_log_interval_secs=5"):
        assert C.run_dir(load_config([*base, same])) == d0, same
    # ... training options do not.
    dirs = {C.run_dir(load_config([*base, o])) for o in (
        "lr=1e-3", "loss=dpo", "loss=caldpo", "loss=cal_dpo", "seed=1", "batch_size=8", "max_length=256",
        "datasets=[hh]", "optimizer=AdamW", "n_examples=64", "model=pythia70m", "kernels.backend=reference")}
    assert d0 not in dirs and len(dirs) == 12
    assert C.run_dir(load_config([*base, "loss=cal_dpo", "loss.shift=0.2"])) != C.run_dir(load_config(
        [*base, "loss=cal_dpo"]))
    # The archive is identified by the file, not only its name.
    a = tmp_path / "policy.pt"
    a.write_bytes(b"1")
    d1 = C.run_dir(load_config([*base, f"model.archive={a}"]))
    a.write_bytes(b"22")
    assert C.run_dir(load_config([*base, f"model.archive={a}"])) != d1


def test_stored_run_with_other_options_stops_and_lists_them(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(["device=cpu", "lr=1e-3", "save_every=2"])
    validate(cfg, 1)
    assert C.check_run_dir(cfg, run) == {}
    C.write_run_config(cfg, run)
    (run / "metrics.jsonl").write_text("")  # the run trained (a run stopped in its setup protects nothing)
    stored = (run / "config.yaml").read_text()
    assert C.check_run_dir(cfg, run) == {}
    changed = load_config(["device=cpu", "lr=1e-5", "save_every=2", "max_length=128"])
    with pytest.raises(ConfigError) as e:
        C.check_run_dir(changed, run)
    assert "lr: 0.001 -> 1e-05" in str(e.value) and "max_length: 512 -> 128" in str(e.value)
    assert "save_every" not in str(e.value)
    C.write_run_config(changed, run)  # never rewritten
    assert (run / "config.yaml").read_text() == stored
    others = C.check_run_dir(load_config(["device=cpu", "lr=1e-3", "save_every=7"]), run)
    assert others == {"save_every": (2, 7)}


def test_help_lists_every_option(capsys):
    assert cli(["--help"]) == 0
    out = capsys.readouterr().out
    for group in ([], *[[f"loss={n}"] for n in C.group_options("loss")]):
        cfg = load_config(group)
        keys = C._paths(cfg)
        leaves = {k for k in keys if not any(o.startswith(k + ".") for o in keys)}
        for k in leaves - {"loss.name"}:  # the loss is chosen as loss=<name>
            assert f"  {k}=" in out, k
