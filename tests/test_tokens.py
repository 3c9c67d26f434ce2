"""Tokenized splits in flat arrays and their on-disk cache (caldpo.train.tokens, schedule.Examples).

* the batched, cached path gives exactly the ids, labels, prompt lengths, kept examples and report
  counts of the path it replaced (``_tokenize_oracle``, a frozen copy of it), on the real HH and
  TL;DR rows and on generated rows that hit every truncation and drop rule, for several tokenizer
  families, preference and SFT;
* the cache: a second load tokenizes nothing and reads no row; a truncated file, a flipped index
  byte, an edited data file, another tokenizer or max_length each rebuild it with one log line;
  reports print the same cold and warm; the file is safetensors; an unwritable folder or a full disk
  under it still loads (a full temporary folder too: one OutputError);
* the fingerprint names the examples (not where they came from);
* processes: two runs at once, and torchrun's two ranks, tokenize once;
* no "Token indices sequence length" warning; progress bars on a terminal only.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import _tokenize_oracle as oracle
from _fulldisk import mount_tmpfs, unmount
from _data_fixtures import REALDATA, char_tokenizer, hh, hh_edge_rows, tldr_edge_rows, without_offsets, write_jsonl
from caldpo.train import batches, tokens
from caldpo.train.batches import flatten, tokenize_dataset
from caldpo.train.config import load_config
from caldpo.train.data import DataError, load_dataset
from caldpo.train.schedule import Examples

REPO = Path(__file__).resolve().parents[1]
HH = REALDATA / "hh_rlhf_sample.jsonl"
TLDR = REALDATA / "tldr_comparisons_sample.jsonl"


def _tiny_tokenizer():
    from caldpo.train.tiny import build_tokenizer
    return build_tokenizer()


def _sentencepiece():
    from test_tokenization import sentencepiece_bpe
    return sentencepiece_bpe()


def _pythia_layout():
    """Byte-level BPE with Pythia's post-processor (ByteLevel, trim_offsets=True: whitespace-only tokens
    get empty offsets)."""
    from test_tokenization import byte_level_bpe
    return byte_level_bpe()


TOKENIZERS = {"tiny_byte_level": _tiny_tokenizer, "char": char_tokenizer, "sentencepiece_bpe": _sentencepiece,
              "pythia_layout": _pythia_layout}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


def _cfg(name: str, path: Path, cache: Path, *over: str):
    return load_config([f"datasets=[{name}]", f"data.paths.{name}={path}", f"data.token_cache_dir={cache}", *over])


def _expected(name, path, split, sft, tokenizer, max_length, max_prompt_length, held_out=None):
    """The old path: rows -> prompt groups -> examples -> the frozen per-example tokenization. The
    order the examples carry (``Example.order``, the reference iterator's entry and rank, from the
    loader) is expected as it was before tokenization: (entries, ranks, sizes) of the kept examples."""
    groups, data_report = load_dataset(name, split, sft=sft, path=str(path), on_error="skip", held_out=held_out)
    examples = flatten(groups, sft=sft)
    kept, report = oracle.tokenize_dataset(examples, tokenizer, max_length=max_length,
                                           max_prompt_length=max_prompt_length)
    order_of = {ex.source: ex.order for ex in examples}
    entries = [order_of[k.source][0] for k in kept]
    ranks = [0 if sft else order_of[k.source][1] for k in kept]
    sizes = [1] * len(data_report.order_sizes) if sft else data_report.order_sizes
    return kept, report, (entries, ranks, sizes), len(data_report.order_sizes)


def _assert_same(data: Examples, kept, report, groups, n_groups):
    assert len(data) == len(kept) == report.kept
    for i, want in enumerate(kept):
        ex = data.items[i]
        assert ex.source == want.source
        got = batches.example_dict(ex.prompt, ex.chosen, ex.rejected, ex.tokens)
        assert got["prompt_input_ids"] == want.prompt, ex.source
        assert got["chosen_input_ids"] == want.prompt + want.chosen, ex.source
        assert got["chosen_labels"] == [-100] * len(want.prompt) + want.chosen, ex.source
        if want.rejected is None:
            assert "rejected_input_ids" not in got
        else:
            assert got["rejected_input_ids"] == want.prompt + want.rejected, ex.source
            assert got["rejected_labels"] == [-100] * len(want.prompt) + want.rejected, ex.source
        assert (ex.tokens.prompt_cut, ex.tokens.response_cut) == (want.prompt_cut, want.response_cut)
    t = data.token_reports[0]
    assert (t.examples, t.kept, t.prompts_cut, t.responses_cut, t.dropped, t.skipped) == \
        (report.examples, report.kept, report.prompts_cut, report.responses_cut, report.dropped, report.skipped)
    entries, ranks, sizes = groups
    assert (data.group_of, data.rank_of, data.group_sizes, data.n_groups) == (entries, ranks, sizes, n_groups)


@pytest.mark.parametrize("name, path", [("hh", HH), ("tldr", TLDR)])
@pytest.mark.parametrize("sft", [False, True])
@pytest.mark.parametrize("max_length, max_prompt_length", [(512, 256), (64, 24)])
def test_real_rows_tokenize_as_the_old_path(tok, tmp_path, name, path, sft, max_length, max_prompt_length):
    """Every real row: one HH file serves both splits (data.held_out=0.05 cuts the test split); the TL;DR
    comparison rows are all validation rows (the test split)."""
    cfg = _cfg(name, path, tmp_path, f"max_length={max_length}", f"max_prompt_length={max_prompt_length}")
    cut = n = 0
    for split in ("train", "test") if name == "hh" else ("test",):
        data = Examples(cfg, split, sft=sft, verbose=False, tokenizer=tok)
        kept, report, groups, n_groups = _expected(name, path, split, sft, tok, max_length, max_prompt_length, 0.05)
        _assert_same(data, kept, report, groups, n_groups)
        cut += report.prompts_cut * report.responses_cut
        n += report.examples
    assert n == {("hh", False): 81, ("tldr", False): 19}.get((name, sft), n)  # every pair of the files
    assert cut or max_length == 512  # both cuts are exercised at 64 tokens


@pytest.mark.parametrize("sft", [False, True])
@pytest.mark.parametrize("max_length, max_prompt_length", [(64, 24), (160, 100)])
def test_generated_rows_hit_every_rule_as_the_old_path(tok, tmp_path, sft, max_length, max_prompt_length):
    hh_dir = tmp_path / "hh"
    write_jsonl(hh_dir / "train.jsonl", hh_edge_rows())
    write_jsonl(hh_dir / "test.jsonl", hh_edge_rows(12, seed=5))
    tldr_file = write_jsonl(tmp_path / "tldr" / "comparisons.jsonl", tldr_edge_rows())
    over = (f"max_length={max_length}", f"max_prompt_length={max_prompt_length}", "data.on_error=skip")
    hh_data = Examples(_cfg("hh", hh_dir, tmp_path / "c", *over), "train", sft=sft, verbose=False, tokenizer=tok)
    kept, report, groups, n_groups = _expected("hh", hh_dir, "train", sft, tok, max_length, max_prompt_length)
    _assert_same(hh_data, kept, report, groups, n_groups)
    if not sft and max_length == 64:  # the rows do what they are for
        assert report.dropped.get("identical_after_truncation") and report.prompts_cut and report.responses_cut
        assert report.skipped.get("untokenizable") == 1
        assert any(len(k.chosen) == 1 or len(k.rejected) == 1 for k in kept)  # an empty reply: EOS alone
    tldr = Examples(_cfg("tldr", tldr_file, tmp_path / "c", *over, "data.held_out=0.3"), "train", sft=sft,
                    verbose=False, tokenizer=tok)
    kept, report, groups, n_groups = _expected("tldr", tldr_file, "train", sft, tok, max_length, max_prompt_length,
                                               0.3)
    _assert_same(tldr, kept, report, groups, n_groups)


def test_tokenizer_without_offsets_tokenizes_as_the_old_path():
    """A tokenizer without offsets (slow) places the boundary at the common prefix with the prompt alone."""
    tok = _sentencepiece()
    no_offsets = without_offsets(tok)

    groups, _ = load_dataset("hh", "test", path=str(HH))
    examples = flatten(groups, sft=False)
    for length in (512, 64):
        kept, report = tokenize_dataset(examples, no_offsets, max_length=length, max_prompt_length=length // 2)
        want, want_report = oracle.tokenize_dataset(examples, no_offsets, max_length=length,
                                                    max_prompt_length=length // 2)
        assert [(k.source, k.tokens.prompt.tolist(), k.tokens.chosen.tolist(), k.tokens.rejected.tolist())
                for k in kept] == [(w.source, w.prompt, w.chosen, w.rejected) for w in want]
        assert (report.kept, report.prompts_cut, report.responses_cut) == \
            (want_report.kept, want_report.prompts_cut, want_report.responses_cut)


# ----------------------------------------------------------------------------- the cache


@pytest.fixture
def counted(monkeypatch):
    """Counts of the token cache's builds (each reads every row and tokenizes them, in a child process)
    and of tokenizer calls and row loads in this process (none: the child does them)."""
    calls = {"build": 0, "encode": 0, "load": 0}

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(tokens, "build", counting("build", tokens.build))
    monkeypatch.setattr(batches.TextEncoder, "__call__", counting("encode", batches.TextEncoder.__call__))
    monkeypatch.setattr(tokens, "load_dataset", counting("load", tokens.load_dataset))
    return calls


@pytest.fixture
def hh_dir(tmp_path):
    d = tmp_path / "hh"
    write_jsonl(d / "train.jsonl", hh_edge_rows())
    write_jsonl(d / "test.jsonl", hh_edge_rows(12, seed=5))
    return d


def _load(hh_dir, cache, tok, *over, verbose=False):
    cfg = _cfg("hh", hh_dir, cache, "max_length=64", "max_prompt_length=24", "data.on_error=skip", *over)
    return Examples(cfg, "train", sft=False, verbose=verbose, tokenizer=tok)


def _ids(data):
    return [(ex.source, ex.tokens.prompt.tolist(), ex.tokens.chosen.tolist(), ex.tokens.rejected.tolist())
            for ex in data.items]


def _cache_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "caldpo"]


def test_second_load_tokenizes_nothing_and_prints_the_same_reports(hh_dir, tmp_path, counted, capsys):
    tok = char_tokenizer()
    cold = _load(hh_dir, tmp_path / "c", tok, verbose=True)
    cold_out = capsys.readouterr().out
    assert counted == {"build": 1, "encode": 0, "load": 0}  # built in a child process
    counted.update(build=0)
    warm = _load(hh_dir, tmp_path / "c", tok, verbose=True)
    assert counted == {"build": 0, "encode": 0, "load": 0}
    assert capsys.readouterr().out == cold_out and "data hh/train" in cold_out and "tokens hh/train" in cold_out
    assert _ids(warm) == _ids(cold) and warm.fingerprint == cold.fingerprint
    assert warm.group_of == cold.group_of and warm.n_groups == cold.n_groups
    assert [str(r) for r in warm.reports + warm.token_reports] == [str(r) for r in cold.reports + cold.token_reports]
    assert [f.name for f in (tmp_path / "c").glob("*.tokens")] == [warm.tables[0].path.name]


def _index_range(file: Path, name: str) -> tuple[int, int]:
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "cut short or appended to"),
    ("flip_index", "index's sha256 differs"),
    ("empty", "no safetensors header"),
])
def test_a_damaged_cache_is_rebuilt_with_one_line(hh_dir, tmp_path, counted, caplog, damage, reason):
    tok = char_tokenizer()
    cold = _load(hh_dir, tmp_path / "c", tok)
    file, want, fingerprint = cold.tables[0].path, _ids(cold), cold.fingerprint
    del cold  # its mapping sees the damage written in place below
    raw = bytearray(file.read_bytes())
    if damage == "truncate":
        raw = raw[:-100]
    elif damage == "flip_index":
        begin, _ = _index_range(file, "example_tokens")
        raw[begin + 9] ^= 0x10
    else:
        raw = bytearray()
    file.write_bytes(bytes(raw))
    counted.update(build=0)
    caplog.set_level(logging.INFO, logger="caldpo")
    again = _load(hh_dir, tmp_path / "c", tok)
    lines = _cache_lines(caplog)
    assert len(lines) == 1 and "damaged" in lines[0] and reason in lines[0] and str(file) in lines[0], lines
    assert counted["build"] == 1 and _ids(again) == want and again.fingerprint == fingerprint
    caplog.clear()
    _load(hh_dir, tmp_path / "c", tok)
    assert _cache_lines(caplog) == []  # the rebuilt file is trusted again


def test_an_edited_data_file_gets_a_new_key(hh_dir, tmp_path, counted, caplog):
    tok = char_tokenizer()
    cold = _load(hh_dir, tmp_path / "c", tok)
    lines = (hh_dir / "train.jsonl").read_text().splitlines()
    lines[0] = json.dumps(hh("\n\nHuman: edited\n\nAssistant:", " a new reply", " another"))
    (hh_dir / "train.jsonl").write_text("\n".join(lines) + "\n")
    caplog.set_level(logging.INFO, logger="caldpo")
    counted.update(build=0)
    edited = _load(hh_dir, tmp_path / "c", tok)
    msg = _cache_lines(caplog)
    assert len(msg) == 1 and f"; kept beside {cold.tables[0].path.name}, which differs in: the data files" in msg[0], msg
    assert counted["build"] == 1 and edited.items[0].prompt == "\n\nHuman: edited\n\nAssistant:"
    assert edited.fingerprint != cold.fingerprint and edited.tables[0].path != cold.tables[0].path


@pytest.mark.parametrize("change, said", [("tokenizer", "the tokenizer"), ("max_length", "max_length 64 -> 80")])
def test_another_tokenizer_or_length_gets_a_new_key(hh_dir, tmp_path, counted, caplog, change, said):
    tok = char_tokenizer()
    cold = _load(hh_dir, tmp_path / "c", tok)
    caplog.set_level(logging.INFO, logger="caldpo")
    counted.update(build=0)
    if change == "tokenizer":
        other = _load(hh_dir, tmp_path / "c", _tiny_tokenizer())
    else:
        other = _load(hh_dir, tmp_path / "c", tok, "max_length=80")
    msg = _cache_lines(caplog)
    assert len(msg) == 1 and said in msg[0], msg
    assert counted["build"] == 1 and _ids(other) != _ids(cold) and other.fingerprint != cold.fingerprint
    caplog.clear()
    counted.update(build=0)
    assert _ids(_load(hh_dir, tmp_path / "c", tok)) == _ids(cold)  # both stay cached side by side
    assert counted == {"build": 0, "encode": 0, "load": 0} and _cache_lines(caplog) == []


def test_the_build_runs_in_a_child_process_or_here_for_a_tokenizer_that_cannot_be_pickled(hh_dir, tmp_path, counted):
    """The build's memory (every row's text at once) is a child process's; a tokenizer that cannot be
    sent there (a class defined in a function) is used in this process, with the same result."""
    import sys as _sys
    child = _load(hh_dir, tmp_path / "a", char_tokenizer())
    assert counted == {"build": 1, "encode": 0, "load": 0}
    tok = char_tokenizer()
    tok.__class__ = type("LocalTokenizer", (type(tok),), {})
    here = _load(hh_dir, tmp_path / "b", tok)
    assert counted["build"] == 2 and counted["encode"] > 0 and counted["load"] == 1
    assert _ids(here) == _ids(child) and here.fingerprint == child.fingerprint
    assert "torch" in _sys.modules  # (this process has it; the child imports caldpo.train.tokens without it)


def test_the_fingerprint_names_the_examples_not_their_location(hh_dir, tmp_path):
    tok = char_tokenizer()
    first = _load(hh_dir, tmp_path / "c", tok)
    moved = tmp_path / "moved"
    hh_dir.rename(moved)
    again = _load(moved, tmp_path / "c", tok)
    assert again.fingerprint == first.fingerprint and again.items[0].source.startswith(str(moved))
    lines = (moved / "train.jsonl").read_text().splitlines()
    (moved / "train.jsonl").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # two rows swapped
    assert _load(moved, tmp_path / "c", tok).fingerprint != first.fingerprint
    assert len(first.fingerprint) == 64 and int(first.fingerprint, 16) >= 0


def test_the_cache_file_is_safetensors(hh_dir, tmp_path):
    from safetensors.numpy import load_file
    data = _load(hh_dir, tmp_path / "c", char_tokenizer())
    table = data.tables[0]
    loaded = load_file(table.path)
    assert sorted(loaded) == sorted(name for name, _, _ in tokens.LAYOUT)
    for name, array in loaded.items():
        assert np.array_equal(array, table.arrays[name]), name
    assert not table.arrays["tokens"].flags.writeable  # a read-only view of the mapped file


def test_an_unwritable_cache_folder_still_loads(hh_dir, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    caplog.set_level(logging.INFO, logger="caldpo")
    data = _load(hh_dir, blocker / "c", char_tokenizer())
    msg = _cache_lines(caplog)
    assert len(msg) == 1 and "cannot be written" in msg[0] and data.tables[0].path is None and len(data) > 0
    assert _ids(data) == _ids(_load(hh_dir, tmp_path / "ok", char_tokenizer()))


@pytest.fixture
def full_folder(monkeypatch):
    """``full_folder(path)``: a folder whose writes run out of room. A real 64 KiB tmpfs where this process may
    mount (root with CAP_SYS_ADMIN, as in CI; the child process that builds the table meets the full disk
    itself); elsewhere the build runs in this process and the table writer raises ENOSPC under the folder."""
    import errno
    mounted = []

    def make(path: Path) -> Path:
        if mount_tmpfs(path, "64k"):
            mounted.append(path)
            return path
        monkeypatch.setattr(tokens, "_build_in_child", lambda *a, **k: False)
        real_add = tokens._Writer.add

        def add(self, *a, **k):
            if str(self.file).startswith(str(path)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_add(self, *a, **k)
        monkeypatch.setattr(tokens._Writer, "add", add)
        return path
    yield make
    for p in mounted:
        unmount(p)


def test_a_full_cache_disk_still_loads_and_a_full_temporary_folder_is_one_line(hh_dir, tmp_path, caplog,
                                                                               full_folder, monkeypatch):
    """The disk under the token cache fills while the table is written: one warning (the folder, the error,
    the free space), the split tokenized into a temporary file instead, the same examples, nothing left in
    the cache folder but its lock. No room in the temporary folder either: OutputError naming it."""
    from caldpo.files import OutputError
    full = full_folder(tmp_path / "full")
    caplog.set_level(logging.INFO, logger="caldpo")
    data = _load(hh_dir, full / "c", char_tokenizer())
    msg = _cache_lines(caplog)
    assert len(msg) == 1 and "No space left on device" in msg[0] and "free on" in msg[0], msg
    assert "without caching it" in msg[0] and data.tables[0].path is None
    assert _ids(data) == _ids(_load(hh_dir, tmp_path / "ok", char_tokenizer()))
    assert sorted(p.suffix for p in (full / "c").iterdir()) == [".lock"]  # no file, no temporary left
    monkeypatch.setattr("tempfile.tempdir", str(full))
    with pytest.raises(OutputError, match=r"tokenizing hh/train: writing its token table in .*full.* failed: "
                                          r"\[Errno 28\] No space left on device \(.*free on .*\); free space"):
        _load(hh_dir, full / "c2", char_tokenizer())


def test_a_data_error_leaves_no_cache_file(hh_dir, tmp_path):
    with pytest.raises(DataError, match=r"train.jsonl:8: the tokenizer cannot encode"):
        Examples(_cfg("hh", hh_dir, tmp_path / "c", "max_length=64", "max_prompt_length=24"), "train", sft=False,
                 verbose=False, tokenizer=char_tokenizer())
    assert sorted(p.suffix for p in (tmp_path / "c").iterdir()) == [".lock"]  # no file, no temporary left


def test_generation_loads_texts_without_a_tokenizer(hh_dir, tmp_path):
    texts = Examples(_cfg("hh", hh_dir, tmp_path / "c", "data.on_error=skip"), "train", sft=True, verbose=False)
    groups, _ = load_dataset("hh", "train", sft=True, path=str(hh_dir), on_error="skip")
    assert [(e.prompt, e.chosen, e.rejected, e.tokens) for e in texts.items] == \
        [(g.prompt, g.sft_target, None, None) for g in groups.values()]
    assert texts.token_reports == [] and texts.items[-1] == texts.items[len(texts) - 1]


# ----------------------------------------------------------------------------- several processes


def _worker(args, env_extra=None, torchrun=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", **(env_extra or {})}
    cmd = [sys.executable, str(REPO / "tests" / "_tokens_worker.py"), *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--standalone", *cmd[1:]]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-4000:]


def test_two_ranks_tokenize_once(hh_dir, tmp_path):
    """torchrun, 2 ranks (gloo): rank 0 builds, rank 1 waits and maps the same file."""
    _finish(_worker([str(hh_dir), str(tmp_path / "c"), str(tmp_path / "out")], torchrun=2))
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["builds"] == 1 and ranks[1]["builds"] == 0
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"] and ranks[0]["n"] == ranks[1]["n"] > 0
    assert ranks[0]["file"] == ranks[1]["file"]


def test_two_runs_at_once_tokenize_once(hh_dir, tmp_path):
    """Two processes without a process group: the one that takes the split's lock builds, the other
    (started while the first is building) waits for the lock and maps the file."""
    out = tmp_path / "out"
    first = _worker([str(hh_dir), str(tmp_path / "c"), str(out), "--hold-build"])
    second = _worker([str(hh_dir), str(tmp_path / "c"), str(out), "--after-build-starts"])
    _finish(first)
    _finish(second)
    runs = [json.loads((out / f"{role}.json").read_text()) for role in ("hold-build", "after-build-starts")]
    assert runs[0]["builds"] == 1 and runs[1]["builds"] == 0
    assert runs[0]["fingerprint"] == runs[1]["fingerprint"]


# ----------------------------------------------------------------------------- what the user sees


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_no_sequence_length_warning_reaches_the_user(tmp_path, capfd):
    """transformers warns (once per tokenizer) when a text has more tokens than the tokenizer's
    model_max_length; caldpo truncates itself, so neither loading nor encoding a prompt for
    generation shows it, and the tokenizer's own call afterwards still does."""
    tok = _tiny_tokenizer()
    assert tok.model_max_length == 256
    long = " ".join(["word"] * 800)
    d = tmp_path / "hh"
    write_jsonl(d / "train.jsonl", [hh(f"\n\nHuman: {long} {i}\n\nAssistant:", f" {long} yes", " no") for i in range(3)])
    write_jsonl(d / "test.jsonl", [hh(f"\n\nHuman: {long}\n\nAssistant:", " yes", " no")])
    seen = _Records()
    logging.getLogger("transformers").addHandler(seen)  # whatever transformers' own handler writes to
    try:
        capfd.readouterr()
        data = Examples(_cfg("hh", d, tmp_path / "c"), "train", sft=False, verbose=True, tokenizer=tok)
        batches.encode_prompt(data.items[0].prompt, tok)
        batches.encode_example(data.items[0].prompt, data.items[0].chosen, None, tok, max_length=512,
                               max_prompt_length=256, truncation_mode="keep_end")
        out, err = capfd.readouterr()
        assert "tokens hh/train" in out and len(data.items[0].tokens.prompt) == 256
        assert "Token indices sequence length" not in out + err + "".join(seen.messages)
        tok("x " * 600)  # the tokenizer itself still warns (its once-per-tokenizer warning was not spent)
        assert any("Token indices sequence length" in m for m in seen.messages)
    finally:
        logging.getLogger("transformers").removeHandler(seen)


@pytest.mark.parametrize("tty, verbose", [(True, True), (False, True), (True, False)])
def test_progress_bars_only_on_a_terminal_of_the_main_rank(hh_dir, tmp_path, monkeypatch, capfd, tty, verbose):
    """(The bars are drawn by the build's child process, on the stderr it inherits.)"""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    _load(hh_dir, tmp_path / "c", char_tokenizer(), verbose=verbose)
    err = capfd.readouterr().err
    shown = tty and verbose  # verbose: the main rank
    assert ("rows hh/train" in err and "tokenize hh/train" in err) == shown, err[-500:]


class _HubRows(list):
    """What datasets.load_dataset returns, for a fake hub: rows, and the library's content fingerprint."""
    _fingerprint = "abc123"


def test_hub_splits_are_cached_by_the_libraries_fingerprint(tmp_path, monkeypatch, counted):
    """A hub split is keyed by the ``datasets`` fingerprint of what was downloaded (built in this process,
    where the library is set up); without one it is tokenized at each start and not cached."""
    import datasets
    rows = [json.loads(line) for line in hh_edge_rows(12, seed=5) if "\\ud83d" not in line and "<|endoftext|>" not in line]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split, cache_dir=None: _HubRows(rows))
    cfg = load_config(["datasets=[hh]", f"data.token_cache_dir={tmp_path / 'c'}", "max_length=64",
                       "max_prompt_length=24", "data.held_out=0.5"])
    first = Examples(cfg, "train", sft=False, verbose=False, tokenizer=char_tokenizer())
    assert counted["build"] == 1 and counted["encode"] > 0 and len(list((tmp_path / "c").glob("*.tokens"))) == 1
    again = Examples(cfg, "train", sft=False, verbose=False, tokenizer=char_tokenizer())
    assert counted["build"] == 1 and _ids(again) == _ids(first) and first.items[0].source.startswith("Anthropic/hh-rlhf/")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split, cache_dir=None: list(rows))  # no fingerprint
    uncached = Examples(cfg, "train", sft=False, verbose=False, tokenizer=char_tokenizer())
    assert counted["build"] == 2 and _ids(uncached) == _ids(first) and uncached.tables[0].path is None
