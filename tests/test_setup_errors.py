"""What a user sees when a run stops during setup: another model's archive, a corrected rerun, Ctrl-C."""
import pytest
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

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
