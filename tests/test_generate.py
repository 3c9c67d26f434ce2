"""Generation as the authors' generate.py: greedy by default, seeded sampling, every prompt,
length-sorted batches returned in input order, prompts cut only past the model's positions
and then by the training truncation rule keeping the prompt's final cue."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from _fulldisk import full_disk_fixture  # noqa: F401 (the full_disk fixture)
from _readonly import read_only_fixture  # noqa: F401 (the read_only fixture)
from conftest import REPO, TINY, run_train
from caldpo.train.batches import encode_prompt, prompt_cue_tokens, truncate_prompt
from caldpo.train.config import load_config
from caldpo.train.generate import generate_responses, prompt_ids_for_generation

PROMPTS = ["\n\nHuman: What is 2 plus 2?\n\nAssistant:",
           "\n\nHuman: hi\n\nAssistant:",
           "\n\nHuman: Tell me a short story about a fox and a dog, please.\n\nAssistant:"]
TLDR = "SUBREDDIT: r/AskReddit\nTITLE: A short title\nPOST: " + "A short post. " * 40 + "\nTL;DR:"


@pytest.fixture(scope="module")
def tiny(tiny_logprob_model):
    _, model, tok = tiny_logprob_model
    return model, tok


def _cfg(*over):
    return load_config([*TINY, *over])


def greedy_oracle(lm, tok, prompt, n):
    """Independent greedy decoding: one unpadded prompt, argmax of the full forward's last logits."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = lm(input_ids=torch.tensor([ids + out])).logits[0, -1].double()
            nxt = int(logits.argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


def test_greedy_default_matches_argmax_in_input_order(tiny):
    model, tok = tiny
    cfg = _cfg("max_new_tokens=6")
    model.train()
    assert cfg.generate.temperature == 0 and cfg.generate.n_prompts is None and cfg.generate.batch_size is None
    got = generate_responses(model, tok, PROMPTS, cfg, torch.device("cpu"), batch_size=2)
    assert model.lm.training  # the model's mode is restored
    model.eval()
    assert got == [greedy_oracle(model.lm, tok, p, 6) for p in PROMPTS]
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) == 3  # batches padded, sorted, then reordered


def test_sampling_is_seeded_and_leaves_the_training_rng_alone(tiny):
    model, tok = tiny
    cfg = _cfg("max_new_tokens=8", "generate.temperature=1.5")
    state = torch.get_rng_state()
    a = generate_responses(model, tok, PROMPTS, cfg, torch.device("cpu"), batch_size=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate_responses(model, tok, PROMPTS, cfg, torch.device("cpu"), batch_size=3)
    c = generate_responses(model, tok, PROMPTS, _cfg("max_new_tokens=8", "generate.temperature=1.5", "seed=1"),
                           torch.device("cpu"), batch_size=3)
    assert a == b and a != c


def test_prompt_cut_keeps_the_cue(tiny):
    _, tok = tiny
    ids, offsets = encode_prompt(TLDR, tok)
    # no cut while the prompt fits the positions
    assert prompt_ids_for_generation([TLDR], tok, ["keep_start"], None) == [ids]
    assert prompt_ids_for_generation([TLDR], tok, ["keep_start"], len(ids)) == [ids]
    limit = 24
    (cut,) = prompt_ids_for_generation([TLDR], tok, ["keep_start"], limit)
    text = tok.decode(cut)
    assert len(cut) == limit and text.startswith("SUBREDDIT: r/") and text.endswith("\nTL;DR:")
    # the same rule as training's (truncate_prompt), which without the cue loses "TL;DR:"
    cue = prompt_cue_tokens(TLDR, offsets, limit)
    assert cut == truncate_prompt(ids, limit, "keep_start", keep_last=cue)
    assert not tok.decode(truncate_prompt(ids, limit, "keep_start")).endswith("TL;DR:")
    assert tok.decode(truncate_prompt(ids, limit, "keep_end")).endswith("\nTL;DR:")


def test_generation_cuts_only_past_the_positions(tiny):
    model, tok = tiny
    n_pos = model.lm.config.max_position_embeddings
    n_ids = len(encode_prompt(TLDR, tok)[0])
    assert n_ids > 48  # longer than TINY's max_prompt_length: training would cut it, generation does not
    new = n_pos - 30  # positions left for the prompt: 30 < n_ids, so it is cut keeping the cue
    cfg = _cfg(f"max_new_tokens={new}")
    (cut,) = prompt_ids_for_generation([TLDR], tok, ["keep_start"], n_pos - new)
    assert len(cut) == 30 and tok.decode(cut).endswith("TL;DR:")
    out = generate_responses(model, tok, [TLDR], cfg, torch.device("cpu"), batch_size=1, truncation_modes=["keep_start"])
    assert isinstance(out[0], str)


def test_cli_help():
    proc = subprocess.run([sys.executable, "-m", "caldpo.train.generate", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "greedy" in proc.stdout and "generate.temperature" in proc.stdout


def test_main_generates_for_every_prompt(tmp_path):
    from caldpo.train.data import load_dataset
    from caldpo.train.generate import main
    out = main([*TINY, "max_new_tokens=3", f"generate.output={tmp_path / 's.json'}"])
    rows = json.loads(out.read_text())
    groups, _ = load_dataset("sample", "test", sft=True)
    assert [r["prompt"] for r in rows] == [g.prompt for g in groups.values()]  # all, in dataset order
    assert [r["reference"] for r in rows] == [g.sft_target for g in groups.values()]


def test_sample_during_eval_writes_policy_and_reference(tmp_path):
    run_dir = tmp_path / "run"
    run_train([*TINY, "loss=dpo", "n_examples=4", "batch_size=4", "n_eval_examples=4", "eval_batch_size=4",
               "sample_during_eval=true", "n_eval_model_samples=3", "max_new_tokens=5", "export_hf=false",
               f"run_dir={run_dir}"])
    rows = json.loads((run_dir / "samples" / "step_0.json").read_text())
    assert len(rows) == 3 and all(set(r) == {"prompt", "response", "reference_model_response", "reference"}
                                  for r in rows)
    # step 0: policy = reference and decoding is greedy, so both write the same text
    assert [r["response"] for r in rows] == [r["reference_model_response"] for r in rows]


def test_a_full_disk_at_the_training_samples_is_one_line(tmp_path, full_disk):
    """samples/step_<N>.json written during an evaluation onto a full disk: one line (path, error, free
    space), exit 3, no traceback, no partial file."""
    run_dir = tmp_path / "run"
    full = full_disk(run_dir / "samples")
    proc = run_train([*TINY, "loss=dpo", "n_examples=4", "batch_size=4", "n_eval_examples=4", "eval_batch_size=4",
                      "sample_during_eval=true", "n_eval_model_samples=3", "max_new_tokens=5", "export_hf=false",
                      f"run_dir={run_dir}"], check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith(f"caldpo: writing samples {full / 'step_0.json'} failed: [Errno 28] No space left on "
                           "device (") and "MiB free on" in last, last
    assert sorted(p.name for p in full.iterdir()) == [".filler"]


@pytest.mark.parametrize("override, message", [
    ("generate.n_prompts=0", "generate.n_prompts=0: must be >= 1 (null: every prompt of the split)"),
    ("generate.n_prompts=-2", "generate.n_prompts=-2: must be >= 1"),
    ("generate.batch_size=0", "generate.batch_size=0: must be >= 1"),
    ("generate.temperature=-1", "generate.temperature=-1.0: must be >= 0"),
])
def test_generate_options_that_cannot_run_are_config_errors(tmp_path, capsys, monkeypatch, override, message):
    """Refused before the model loads, and nothing (not an empty samples file) is written."""
    import caldpo.train.model as model
    from caldpo.train.generate import cli

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(model, "load_causal_lm", no_load)
    out = tmp_path / "s.json"
    assert cli([*TINY, override, f"generate.output={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"caldpo: config error: {message}") and err.count("\n") == 1 and not out.exists()


def test_unwritable_output_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, read_only):
    import caldpo.train.model as model
    from caldpo.train.generate import cli

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded (and would generate) for an output that cannot be written")
    monkeypatch.setattr(model, "load_causal_lm", no_load)
    out = read_only(tmp_path / "ro") / "samples.json"
    assert cli([*TINY, f"generate.output={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"caldpo: cannot write generate.output={out}: [Errno 30] Read-only file system")
    assert "MiB free" in err and err.count("\n") == 1


def test_failed_samples_write_keeps_the_previous_file(tmp_path, capsys, monkeypatch):
    """A full disk at the end: one line (path, error, free space), status 3, the previous samples.json whole."""
    import caldpo.files as files
    from caldpo.train.generate import cli

    out = tmp_path / "samples.json"
    out.write_text('[{"prompt": "p", "response": "old", "reference": "r"}]')
    before = out.read_bytes()

    def full(path, data):  # write_atomic on a full disk (tests/test_files.py: the previous file stays whole)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files, "write_atomic", full)
    assert cli([*TINY, "generate.n_prompts=2", "max_new_tokens=2", f"generate.output={out}"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"caldpo: writing samples {out} failed: [Errno 28] No space left on device")
    assert "previous samples.json is unchanged" in err[-1] and "Traceback" not in "\n".join(err)
    assert out.read_bytes() == before
