"""What a user sees when a run stops during setup: another model's archive, a corrected rerun, Ctrl-C,
damaged run-directory files, a read-only run directory, a damaged model folder."""
import json

import pytest
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from _readonly import read_only_fixture  # noqa: F401 (the read_only fixture)
import caldpo.train.trainer as trainer_module
from caldpo.train.__main__ import cli
from caldpo.train.config import ConfigError, check_run_dir, load_config, write_run_config
from caldpo.train.model import apply_archive

TINY = ["model=tiny", "datasets=[sample]", "max_length=96", "max_prompt_length=48", "device=cpu"]


def _neox(hidden):
    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=2 * hidden, vocab_size=64))


def test_archive_of_another_model_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.archive=x.pt was saved from another model.*size mismatch"):
        apply_archive(_neox(32), _neox(16).state_dict(), "x.pt")
    apply_archive(_neox(32), _neox(32).state_dict(), "x.pt")  # the same shapes load


def test_run_dir_that_never_trained_takes_the_corrected_command(tmp_path):
    first = load_config([*TINY, "batch_size=8", f"run_dir={tmp_path}"])
    write_run_config(first, tmp_path)  # the run stopped in its setup (e.g. dataset smaller than a batch)
    fixed = load_config([*TINY, "batch_size=4", f"run_dir={tmp_path}"])
    assert check_run_dir(fixed, tmp_path) == {}
    write_run_config(fixed, tmp_path)
    assert "batch_size: 4" in (tmp_path / "config.yaml").read_text()
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # once it has trained, its options are protected
    with pytest.raises(ConfigError, match=r"batch_size: 4 -> 8"):
        check_run_dir(first, tmp_path)
    write_run_config(first, tmp_path)
    assert "batch_size: 4" in (tmp_path / "config.yaml").read_text()


def test_ctrl_c_during_setup_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer_module, "main", interrupted)
    assert cli([*TINY, f"run_dir={tmp_path}"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("caldpo: interrupted during setup") and "Traceback" not in err


@pytest.mark.parametrize("override, message", [
    ("datasets=[sample,sample]", "sample listed more than once"),
    ("n_examples=0", "n_examples=0: must be >= 1"),
    ("seed=-1", r"seed=-1: must be in \[0, 2\*\*32\) \(the data order seeds numpy's RandomState"),
])
def test_preflight_refuses(override, message):
    from caldpo.train.config import validate
    with pytest.raises(ConfigError, match=message):
        validate(load_config([*TINY, override]), 1)


def test_archive_directory_points_to_its_policy_pt(tmp_path):
    from caldpo.train.config import validate
    (tmp_path / "policy.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=f"is a directory; pass the policy.pt file: model.archive={tmp_path}/policy.pt"):
        validate(load_config([*TINY, f"model.archive={tmp_path}"]), 1)


def _trained_run(run_dir):
    """A run directory as a run leaves it after its first steps: config.yaml, identity.json, metrics."""
    write_run_config(load_config([*TINY, f"run_dir={run_dir}"]), run_dir)
    (run_dir / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 1.0}\n')
    return run_dir


DAMAGE = {  # file -> (damage, what the one line says)
    "identity.json truncated": ("identity.json", lambda t: t[: len(t) // 2], "identity.json: unreadable (Unterminated"),
    "identity.json not caldpo's": ("identity.json", lambda t: '{"options": [1, 2]}', "'options' is a list"),
    "config.yaml not YAML": ("config.yaml", lambda t: "model: [unclosed\n  : :\n", "config.yaml: not YAML"),
    "config.yaml another file": ("config.yaml", lambda t: "- a list\n", "config.yaml: not a caldpo run's"),
    "DONE truncated": ("DONE", lambda t: '{"step": 12, "exam', "DONE: unreadable"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_run_files_are_one_line_naming_the_file_and_what_to_do(tmp_path, capsys, case):
    name, damage, says = DAMAGE[case]
    run_dir = _trained_run(tmp_path / "run")
    path = run_dir / name
    path.write_text(damage(path.read_text() if path.exists() else ""))
    assert cli([*TINY, f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("caldpo: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{path}" in err and says in err and "Restore it from a copy" in err


def test_config_yaml_deleted_after_damage_is_written_again(tmp_path):
    run_dir = _trained_run(tmp_path / "run")
    (run_dir / "config.yaml").unlink()  # what the message for a damaged config.yaml says to do
    cfg = load_config([*TINY, f"run_dir={run_dir}"])
    assert check_run_dir(cfg, run_dir) == {}
    write_run_config(cfg, run_dir)
    assert "max_length: 96" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("where", ["new run_dir", "trained run_dir"])
def test_run_dir_on_a_read_only_filesystem_is_one_line(tmp_path, capsys, read_only, where):
    if where == "new run_dir":
        run_dir = read_only(tmp_path / "ro") / "run"
    else:
        run_dir = _trained_run(tmp_path / "ro")
        read_only(run_dir)
    assert cli([*TINY, f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"caldpo: cannot write run_dir {run_dir}: [Errno 30] Read-only file system (")
    assert "MiB free" in err and "Choose a writable run_dir=" in err


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop_eos(path):
    cfg = json.loads(path.read_text())
    del cfg["eos_token"]
    path.write_text(json.dumps(cfg))


MODEL_DAMAGE = {  # case -> (file, damage, what the line names)
    "config.json truncated": ("config.json", _truncate, "config.json is not valid JSON ("),
    "config.json missing": ("config.json", lambda p: p.unlink(), "no config.json there"),
    "tokenizer.json truncated": ("tokenizer.json", _truncate, "tokenizer.json is not valid JSON"),
    "tokenizer_config.json not an object": ("tokenizer_config.json", lambda p: p.write_text("[]"),
                                            "tokenizer_config.json holds a JSON list"),
    "weights truncated": ("model.safetensors", _truncate, "model.safetensors: "),
    "tokenizer without EOS": ("tokenizer_config.json", _drop_eos, "the tokenizer has no EOS token"),
}


@pytest.mark.parametrize("case", sorted(MODEL_DAMAGE))
def test_a_damaged_model_folder_is_a_config_error_before_the_data_loads(tmp_path, capsys, monkeypatch, case):
    import shutil

    import caldpo.train.schedule as schedule
    from caldpo.train.tiny import tiny_model_dir

    def no_data(*a, **kw):
        raise AssertionError("the data loaded before the model folder was checked")
    monkeypatch.setattr(schedule, "load_split", no_data)
    name, damage, says = MODEL_DAMAGE[case]
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), folder)
    damage(folder / name)
    args = ["model=hf", f"model.name_or_path={folder}", *TINY[1:], f"run_dir={tmp_path / 'run'}"]
    for preflight in ([], ["--preflight=submit"]):  # the run, and a submission host's check
        assert cli([*preflight, *args]) == 2, preflight
        err = capsys.readouterr().err
        assert err.startswith(f"caldpo: config error: model.name_or_path={folder}: ") and err.count("\n") == 1, err
        assert says in err and "Traceback" not in err
