"""Convert TL;DR exports into the training files ``caldpo.train.data`` reads.

    python -m caldpo.train.preproc tldr-pref --input comparisons/ --out data/tldr_pref
    python -m caldpo.train.preproc tldr-sft --input UCL-DARK/openai-tldr-filtered --out data/tldr_sft

``tldr-pref`` reads OpenAI comparison rows (``comparisons/batch*.json``, JSON lines, or
.jsonl/.json files, optionally gzipped) and writes ``train.jsonl`` (rows whose split is
"train") and ``test.jsonl`` ("valid1"/"valid2") with ``{"prompt", "chosen", "rejected"}``.
``tldr-sft`` reads filtered rows ``{subreddit, title, post, summary}`` (.jsonl/.json/
.parquet files named by split, or a hub dataset) and writes ``{"prompt", "target"}``
rows to ``<split>.jsonl``. Both apply the row rules of ``caldpo.train.data`` (templates,
CNN/DM dropped, identical pairs dropped) and print one data report per split written.
A split that would be empty (``tldr-pref`` on files holding only validation rows, a split
file whose rows were all dropped) is an error naming the inputs, and nothing is written.
The split files are written into a fresh folder beside ``--out`` and swapped in for it whole,
so ``--out`` holds exactly this input's splits (never one left from an earlier output) and a
failed run leaves it as it was; a folder holding files preproc did not write is refused.
Errors print one line ``caldpo: ...`` and exit with status 2 (3: a write failed, the disk full).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from caldpo.cli import run
from caldpo.files import OutputError, free_space, os_reason, swap_dir

from .data import (DataError, DataReport, Record, RowError, _field, apply_row, iter_file, iter_hub,
                   parse_tldr_comparison, parse_tldr_filtered)

PREF_SPLITS = {"train": "train", "valid1": "test", "valid2": "test"}
DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")


def input_files(inputs: Iterable[str]) -> list[Path]:
    """The data files named by ``inputs``; a directory contributes its data files, sorted."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(DATA_SUFFIXES))
            if not found:
                raise DataError(str(p), None, f"no data files ({', '.join(DATA_SUFFIXES)}) in this folder",
                                option="--input", hint="give the folder of the exported files, or the files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(str(p), None, "no such file or directory", option="--input")
    return files


class _SplitWriter:
    """Writes rows to ``<split>.jsonl`` in a fresh folder beside ``out``; ``close(commit=True)`` swaps that
    folder in for ``out`` whole (``caldpo.files.swap_dir``), so ``out`` holds exactly the splits of this
    input, never a split file left from an earlier output; ``close(commit=False)`` removes it.

    ``out`` may be new, empty, or an earlier output of preproc (``*.jsonl`` files only): a folder holding
    anything else is refused (OutputError, exit 2), since the swap replaces the folder and would lose it.
    Raises OutputError when the folder cannot be written (2) or a write fails (3: disk full, with the free space).
    """

    def __init__(self, out: Path):
        self.out, self.files = out, {}
        if out.is_dir():
            foreign = sorted(p.name for p in out.iterdir() if not (p.is_file() and p.name.endswith(".jsonl")))
            if foreign:
                raise OutputError(f"--out {out}: holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, "
                                  "which preproc did not write; its output replaces the whole folder. Choose a new "
                                  "or empty folder (or one holding only an earlier preproc output)", exit_code=2)
        elif out.exists():
            raise OutputError(f"--out {out}: is a file; name a folder", exit_code=2)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        except OSError as e:
            raise OutputError(f"cannot write --out {out}: {os_reason(e)} ({free_space(out.parent)}); nothing was "
                              "read or written. Choose a writable folder", exit_code=2) from None

    def write(self, split: str, row: dict) -> None:
        try:
            if split not in self.files:
                self.files[split] = open(self.tmp / f"{split}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
            self.files[split].write(json.dumps(row, ensure_ascii=False) + "\n")
        except OSError as e:
            raise self._failed(e) from None

    def _failed(self, e: OSError) -> OutputError:
        before = f"{self.out} is unchanged" if self.out.exists() else f"{self.out} was not created"
        return OutputError(f"writing --out {self.out} failed: {os_reason(e)} ({free_space(self.out.parent)}); "
                           f"{before}. Free space (or choose another folder) and run again", exit_code=3)

    def close(self, commit: bool) -> list[Path]:
        """Close the files; swap the folder in if ``commit`` (returns the files written), else remove it."""
        try:
            for f in self.files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            if commit:
                swap_dir(self.tmp, self.out)
                return [self.out / f"{split}.jsonl" for split in sorted(self.files)]
        except OSError as e:
            if commit:
                raise self._failed(e) from None
        finally:
            for f in self.files.values():
                f.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
        return []


def _check_not_empty(reports: dict[str, DataReport], splits: Iterable[str], source: str, count: str) -> None:
    """An empty split is an error naming the inputs (no split is ever written empty)."""
    for split in splits:
        r = reports.get(split)
        if r is None or getattr(r, count) == 0:
            seen = "; ".join(f"{s}: {x.rows_read} rows read, rules applied: {x.fmt(x.anomalies)}, "
                             f"rows skipped: {x.fmt(x.skipped)}" for s, x in reports.items() if x.rows_read)
            raise DataError(source, None, f"no {split} examples ({seen or 'no rows'})", option="--input",
                            hint=f"add the files holding the {split} rows; nothing was written")


def tldr_pref(inputs: Iterable[str], out: str, on_error: str = "raise") -> dict[str, DataReport]:
    """Comparison files -> ``out/{train,test}.jsonl``; returns the report of each split."""
    files = input_files(inputs)
    source = ", ".join(map(str, files)) if len(files) <= 3 else f"{len(files)} files from {files[0].parent}"
    reports = {s: DataReport("tldr-pref", s, source) for s in ("train", "test")}
    unsplit = DataReport("tldr-pref", "?", source)  # rows whose split cannot be read
    writer = _SplitWriter(Path(out))
    prompts: dict[str, set[str]] = {s: set() for s in reports}

    def route(rec: Record) -> DataReport:
        row = rec.row
        if isinstance(row, dict) and isinstance(row.get("split"), str):
            return reports.get(PREF_SPLITS.get(row["split"]), unsplit)
        return unsplit

    def convert(row) -> None:
        split = _field(row, "split", str)
        if split not in PREF_SPLITS:
            raise RowError("bad_split", f"'split' should be one of {', '.join(PREF_SPLITS)}, is {split!r}")
        report = reports[PREF_SPLITS[split]]
        parsed = parse_tldr_comparison(row, report)
        if parsed is None:
            return
        prompt, chosen, rejected = parsed
        if chosen == rejected:
            report.count("identical_pair_dropped")
            return
        writer.write(PREF_SPLITS[split], {"prompt": prompt, "chosen": chosen, "rejected": rejected})
        report.pairs += 1
        prompts[PREF_SPLITS[split]].add(prompt)

    ok = False
    try:
        for f in files:
            for rec in iter_file(f):
                apply_row(rec, route(rec), on_error, convert)
        _merge_unsplit(reports, unsplit)
        for s, r in reports.items():
            r.prompts = len(prompts[s])
        _check_not_empty(reports, ("train", "test"), source, "pairs")
        ok = True
    finally:
        writer.close(commit=ok)
    return reports


def _merge_unsplit(reports: dict[str, DataReport], unsplit: DataReport) -> None:
    if unsplit.rows_read:
        first = next(iter(reports.values()))
        first.rows_read += unsplit.rows_read
        for k, v in unsplit.skipped.items():
            first.skip(k, v)


def split_of(path: Path) -> str:
    """The split a filtered-data file holds, from its name (train/valid/test)."""
    name = path.name.lower()
    for key, split in (("train", "train"), ("valid", "valid"), ("test", "test")):
        if key in name:
            return split
    raise DataError(str(path), None, "cannot tell the split from the file's name", option="--input",
                    hint="name it train*/valid*/test*")


def _sft_records(inputs: list[str], cache_dir: str | None) -> Iterator[tuple[str, Record]]:
    for item in inputs:
        if not Path(item).exists() and "/" in item and not item.startswith((".", "/")):
            import datasets as hf_datasets

            for split in hf_datasets.get_dataset_split_names(item, cache_dir=cache_dir):
                for rec in iter_hub(item, None, split, cache_dir):
                    yield ("valid" if split == "validation" else split), rec
        else:
            for f in input_files([item]):
                split = split_of(f)
                for rec in iter_file(f):
                    yield split, rec


def tldr_sft(inputs: Iterable[str], out: str, on_error: str = "raise", cache_dir: str | None = None) -> dict[str, DataReport]:
    """Filtered TL;DR rows (files or a hub name) -> ``out/<split>.jsonl`` of {"prompt", "target"}."""
    inputs = list(inputs)
    reports: dict[str, DataReport] = {}
    writer = _SplitWriter(Path(out))
    ok = False
    try:
        for split, rec in _sft_records(inputs, cache_dir):
            report = reports.setdefault(split, DataReport("tldr-sft", split, ", ".join(inputs)))

            def convert(row, split=split, report=report) -> None:
                prompt, target = parse_tldr_filtered(row, report)
                writer.write(split, {"prompt": prompt, "target": target})
                report.prompts += 1

            apply_row(rec, report, on_error, convert)
        _check_not_empty(reports, reports, ", ".join(inputs), "prompts")
        ok = True
    finally:
        writer.close(commit=ok)
    return reports


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m caldpo.train.preproc", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tldr-pref", help="OpenAI comparison files -> DIR/{train,test}.jsonl of prompt/chosen/rejected")
    p.add_argument("--input", nargs="+", required=True, help="comparison .json/.jsonl[.gz] files or directories of them")
    s = sub.add_parser("tldr-sft", help="filtered TL;DR rows -> DIR/<split>.jsonl of prompt/target")
    s.add_argument("--input", nargs="+", required=True,
                   help="jsonl/json/parquet files named train*/valid*/test*, directories of them, or a hub dataset name")
    s.add_argument("--cache-dir", default=None, help="hub cache directory")
    for q in (p, s):
        q.add_argument("--out", required=True, help="output directory")
        q.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                       help="broken rows: stop with file and line (raise) or skip and count them (skip)")
    args = ap.parse_args(argv)

    def work() -> None:
        try:
            if args.command == "tldr-pref":
                reports = tldr_pref(args.input, args.out, args.on_error)
            else:
                reports = tldr_sft(args.input, args.out, args.on_error, args.cache_dir)
        except DataError as e:
            if not e.hint and e.line is not None:
                e.hint = "fix or delete that row, or pass --on-error skip to skip broken rows and count them"
            raise
        for r in reports.values():
            print(r)
        print(f"wrote {', '.join(sorted(str(p) for p in Path(args.out).glob('*.jsonl')))}")

    status = run(work)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
