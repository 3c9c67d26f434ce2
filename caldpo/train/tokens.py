"""Tokenized splits on disk: each split's examples in flat arrays, built once per content key and
memory-mapped by every process.

One dataset split (``hh``/train, ...) is one file in the token cache (``data.token_cache_dir``;
default ``$CALDPO_CACHE/tokens``, else ``~/.cache/caldpo/tokens``), named
``<dataset>-<split>[-sft]-<where8>-<key16>.tokens``. ``key`` hashes everything the examples are
computed from (``key_parts``): the bytes and paths of the data files (or the hub dataset's
fingerprint), the loading options (sft, ``data.on_error``, ``data.held_out``,
``data.max_row_bytes``), the tokenizer (its serialization without truncation/padding state, its
EOS), ``max_length``, ``max_prompt_length``, the dataset's truncation mode, and the code of the
rules (the sources of ``data.py``, ``batches.py`` and this module, the ``tokenizers`` and
``transformers`` versions, ``FORMAT``). A data file edited in place gets a new key.

The file is a safetensors file (an 8-byte little-endian header length, a JSON header giving each
array's dtype, shape and byte range plus ``__metadata__``, then the arrays), readable by the
``safetensors`` library; caldpo maps it once and views the arrays in place:

==============  =====  ======  ====================================================================
array           dtype  shape   holds
==============  =====  ======  ====================================================================
tokens          int32  [T]     each kept example's prompt, chosen and rejected ids, one after another
                               (padded with one 0 to an even count, so the arrays after it align)
example_tokens  int64  [E, 4]  an example's start in ``tokens``, then its prompt, chosen, rejected
                               lengths (rejected -1: an SFT example)
example_text    int64  [E, 3]  string numbers of its prompt, chosen and rejected texts (-1: none)
text_offsets    int64  [S+1]   string s is ``text[text_offsets[s]:text_offsets[s + 1]]``
source_offsets  int64  [E+1]   the same for each example's source row (``path:line``) in ``source``
example_group   int32  [E]     the example's prompt group, 0 <= g < n_groups, in load order
example_order   int32  [E, 2]  its place in the reference iterator's order (``batches.Example.order``):
                               its entry (a shuffle unit, ``data._Groups.slot``) and its rank there
order_sizes     int32  [R]     each entry's rows, dropped ones included (``DataReport.order_sizes``)
example_flags   uint8  [E]     bit 0: its prompt was cut, bit 1: its responses were cut
text, source    uint8          UTF-8 bytes (each text stored once per group)
==============  =====  ======  ====================================================================

``__metadata__["caldpo"]`` (JSON) holds the format, the key and its parts, the counts, the data
and token reports (printed as at a cold start), the sha256 of the index (every array but
``tokens``, ``text`` and ``source``) and the split's fingerprint. Reading checks the header, every
array's dtype, shape and byte range against the file's size, the index's sha256 and the index's
bounds before anything is used (``read_table``); a file that fails is rebuilt with one log line
naming why. A file is built in a child Python process that imports no torch (``build``): grouping
the rows by prompt holds every row's text at once, and that memory goes back to the system when
the child exits instead of staying with the trainer. It is written under a temporary name in the
same folder and renamed into place: a reader never sees a half-written one. Across processes: under torchrun rank 0 builds while the
other ranks wait, then they map its file; processes that share no process group (two runs, or
ranks whose cache folders differ) take an exclusive lock on the split's ``.lock`` file, so one
builds and the others wait and map. A cache folder that cannot be written (read-only, or a disk that
fills while the file is written) costs one warning: the split is tokenized into a temporary file
instead (mapped, its name deleted); only when that fails too is it an error (``OutputError``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import gc
import hashlib
import json
import logging
import mmap
import os
import shutil
import sys
import tempfile
import time
from array import array
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from caldpo.files import OutputError, free_space, os_reason

from .batches import Encoded, Example, TokenReport, flatten, tokenize_examples
from .data import TRUNCATION_MODE, DataError, DataReport, hub_source, load_dataset, local_source

log = logging.getLogger("caldpo")

FORMAT = 2  # bump when the file layout changes (also in the key)
SUFFIX = ".tokens"
HEADER_RESERVE = 1 << 16  # bytes kept for the JSON header in front of the streamed token ids
INDEX = ("example_tokens", "example_text", "text_offsets", "source_offsets", "example_group", "example_order",
         "order_sizes", "example_flags")
LAYOUT = (  # (name, dtype, columns or None) in file order: 8-byte items first, so every array is aligned
    ("tokens", "int32", None), ("example_tokens", "int64", 4), ("example_text", "int64", 3),
    ("text_offsets", "int64", None), ("source_offsets", "int64", None), ("example_group", "int32", None),
    ("example_order", "int32", 2), ("order_sizes", "int32", None), ("example_flags", "uint8", None), ("text", "uint8", None), ("source", "uint8", None))
ST_DTYPES = {"int32": "I32", "int64": "I64", "uint8": "U8"}
PROMPT_CUT, RESPONSE_CUT = 1, 2


def default_cache_dir() -> Path:
    """``$CALDPO_CACHE/tokens``, else ``~/.cache/caldpo/tokens`` (``data.token_cache_dir=null``)."""
    root = os.environ.get("CALDPO_CACHE")
    return Path(root) / "tokens" if root else Path.home() / ".cache" / "caldpo" / "tokens"


# ----------------------------------------------------------------------------- the table


class SplitTable:
    """The examples of one dataset split, in the flat arrays of the module docstring (read-only).

    ``example(i)`` builds the i-th ``batches.Example`` (texts decoded, ``tokens`` views of the ids;
    None for a table built without a tokenizer). ``group``: int32 [E] prompt groups; ``n_groups``;
    ``order``: int32 [E, 2] each example's reference entry and rank, ``order_sizes``: int32 [R] each
    entry's rows (what ``batches.EpochOrder`` orders by);
    ``fingerprint``: hex sha256 of the examples (``Examples.fingerprint``); ``data_report``,
    ``token_report`` (None without a tokenizer); ``path``: the cache file (None when not cached).
    """

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], path: Path | None = None):
        self.arrays, self.meta, self.path = arrays, meta, path
        self.dataset, self.split, self.sft = meta["dataset"], meta["split"], meta["sft"]
        self.truncation_mode = meta["truncation_mode"]
        self.n_groups, self.fingerprint = int(meta["n_groups"]), meta["fingerprint"]
        self.tokenized = bool(meta["tokenized"])
        self.data_report = DataReport(**meta["data_report"])
        self.token_report = TokenReport(**meta["token_report"]) if meta["token_report"] is not None else None
        self.group = arrays["example_group"]
        self.order, self.order_sizes = arrays["example_order"], arrays["order_sizes"]
        self._tokens, self._ex_tokens = arrays["tokens"], arrays["example_tokens"]
        self._ex_text, self._flags = arrays["example_text"], arrays["example_flags"]
        self._text, self._text_off = arrays["text"], arrays["text_offsets"]
        self._source, self._source_off = arrays["source"], arrays["source_offsets"]

    def __len__(self) -> int:
        return len(self._ex_tokens)

    def _string(self, blob: np.ndarray, offsets: np.ndarray, s: int) -> str:
        return blob[int(offsets[s]):int(offsets[s + 1])].tobytes().decode("utf-8", "surrogatepass")

    def example(self, i: int) -> Example:
        prompt, chosen, rejected = (int(s) for s in self._ex_text[i])
        tokens = None
        if self.tokenized:
            start, p, c, r = (int(x) for x in self._ex_tokens[i])
            ids, flags = self._tokens, int(self._flags[i])
            tokens = Encoded(ids[start:start + p], ids[start + p:start + p + c],
                             ids[start + p + c:start + p + c + r] if r >= 0 else None,
                             bool(flags & PROMPT_CUT), bool(flags & RESPONSE_CUT))
        text = functools.partial(self._string, self._text, self._text_off)
        entry, rank = (int(x) for x in self.order[i])
        return Example(text(prompt), text(chosen), text(rejected) if rejected >= 0 else None, self.truncation_mode,
                       self._string(self._source, self._source_off, i), tokens, (entry, rank))


class ExampleList(Sequence):
    """The examples of several tables one after another, as a read-only sequence of ``Example``
    (each built on access from the arrays; a slice gives a list)."""

    def __init__(self, tables: list[SplitTable]):
        self.tables = tables
        self.starts = np.cumsum([0] + [len(t) for t in tables])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        t = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.tables[t].example(i - int(self.starts[t]))


# ----------------------------------------------------------------------------- what a split depends on


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """Which split of which data, loaded how and tokenized to which lengths (``from_config``)."""

    dataset: str
    split: str
    sft: bool
    path: str | None
    on_error: str = "raise"
    held_out: float | None = None
    max_row_bytes: int = 4 << 20
    hub_cache_dir: str | None = None
    max_length: int = 512
    max_prompt_length: int = 256

    @classmethod
    def from_config(cls, cfg, dataset: str, split: str, sft: bool) -> "SplitSpec":
        return cls(dataset, split, sft, (cfg.data.paths or {}).get(dataset), cfg.data.on_error, cfg.data.held_out,
                   int(cfg.data.max_row_bytes), cfg.data.cache_dir, int(cfg.max_length), int(cfg.max_prompt_length))

    @property
    def option(self) -> str:
        return f"data.paths.{self.dataset}" if self.path is not None else f"datasets=[{self.dataset}] (hub)"

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.split}{' (sft)' if self.sft else ''}"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of the code that defines the examples: the sources of data.py, batches.py and this module,
    the tokenizers / transformers versions and ``FORMAT``. Computed when this module is imported (below),
    so that every rank of a job hashes the code it runs even if the files change while it runs."""
    h = hashlib.sha256(f"format {FORMAT}".encode())
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("tokenizers", "transformers"):
        try:
            h.update(f" {dist} {version(dist)}".encode())
        except PackageNotFoundError:
            h.update(f" {dist} missing".encode())
    here = Path(__file__).resolve().parent
    for name in ("data.py", "batches.py", "tokens.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()


code_digest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what the tokenizer does to text: its class, its ``tokenizers`` serialization without
    the truncation and padding state (transformers switches those off for caldpo's calls), or the
    vocabulary of a tokenizer without one, and its EOS token and id."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.eos_token, tokenizer.eos_token_id, bool(getattr(tokenizer, "is_fast", False)),
                         getattr(tokenizer, "split_special_tokens", None)]).encode())
    return h.hexdigest()


def _file_digest(path: Path, count_lines: bool) -> tuple[str, int | None]:
    """(sha256 of the file's bytes, its newline count when asked)."""
    h, lines = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
            if count_lines:
                lines += block.count(b"\n")
    return h.hexdigest(), lines if count_lines else None


def _hub_fingerprint(spec: SplitSpec) -> str | None:
    """The ``datasets`` library's fingerprint of the hub split (None when it has none)."""
    import datasets as hf_datasets

    name, config, hub_split, _ = hub_source(spec.dataset, spec.split, spec.sft)
    args = (name, config) if config else (name,)
    ds = hf_datasets.load_dataset(*args, split=hub_split, cache_dir=spec.hub_cache_dir)
    fp = getattr(ds, "_fingerprint", None)
    return f"{name}/{config}/{hub_split}:{fp}" if isinstance(fp, str) and fp else None


def key_parts(spec: SplitSpec, tokenizer) -> tuple[dict[str, Any] | None, int | None]:
    """(what the split's examples are computed from, the rows expected (newlines of .jsonl files) or None).

    None parts: the hub split has no fingerprint, so nothing names its content: it is not cached.
    Raises DataError for missing data files, as loading would.
    """
    try:
        local = local_source(spec.dataset, spec.split, spec.path)
    except DataError as e:
        e.option = e.option or spec.option
        raise
    rows: int | None = 0
    if local is not None:
        src, _ = local
        files = []
        for f in src.files:
            plain = f.name.lower().endswith(".jsonl")
            digest, lines = _file_digest(f, plain)
            files.append([str(f), f.stat().st_size, digest])
            rows = rows + lines if rows is not None and lines is not None else None
        source = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    else:
        source, rows = _hub_fingerprint(spec), None
        if source is None:
            return None, None
    parts = {"format": FORMAT, "code": code_digest(), "dataset": spec.dataset, "split": spec.split, "sft": spec.sft,
             "source": source, "on_error": spec.on_error, "held_out": spec.held_out,
             "max_row_bytes": spec.max_row_bytes, "truncation_mode": TRUNCATION_MODE[spec.dataset],
             "tokenizer": tokenizer_digest(tokenizer) if tokenizer is not None else None,
             "max_length": spec.max_length if tokenizer is not None else None,
             "max_prompt_length": spec.max_prompt_length if tokenizer is not None else None}
    return parts, rows


def digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_stem(spec: SplitSpec) -> str:
    """``<dataset>-<split>[-sft]-<where8>``: every key of one data location and split shares it."""
    where = hashlib.sha256(str(Path(spec.path).resolve() if spec.path else "hub").encode()).hexdigest()[:8]
    return f"{spec.dataset}-{spec.split}{'-sft' if spec.sft else ''}-{where}"


# ----------------------------------------------------------------------------- writing


class _Writer:
    """Streams one table into ``<file>.<pid>.tmp``: the ids straight into the data section, the strings
    into side files; ``finish`` appends the index and the strings, writes the header, renames."""

    def __init__(self, file: Path):
        self.file = file
        self.tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        self.out = self.text_file = self.source_file = None
        try:
            self.out = open(self.tmp, "wb")
            self.out.write(b"\0" * (8 + HEADER_RESERVE))
            self.text_file = open(self.tmp.with_name(self.tmp.name + ".text"), "w+b")
            self.source_file = open(self.tmp.with_name(self.tmp.name + ".source"), "w+b")
        except BaseException:
            self.close(remove=True)
            raise
        self.n_tokens = 0
        self.pending: list[np.ndarray] = []
        self.pending_n = 0
        self.ex_tokens, self.ex_text, self.text_off, self.source_off = array("q"), array("q"), array("q", [0]), array("q", [0])
        self.group, self.order, self.flags = array("i"), array("i"), array("B")
        # id() of a text -> its string number, for the current prompt group: the group's prompt and
        # responses are one object each, alive while its examples are added (examples come group by group)
        self.string_of: dict[int, int] = {}
        self.last_group = -1
        self.fp_tokens, self.fp_text = hashlib.sha256(), hashlib.sha256()

    def _string(self, s: str | None) -> int:
        if s is None:
            return -1
        k = self.string_of.get(id(s))
        if k is None:
            data = s.encode("utf-8", "surrogatepass")
            self.text_file.write(data)
            self.fp_text.update(data)
            self.text_off.append(self.text_off[-1] + len(data))
            k = self.string_of[id(s)] = len(self.text_off) - 2
        return k

    def add(self, ex: Example, group: int, enc: Encoded | None) -> None:
        if group != self.last_group:
            self.string_of.clear()
            self.last_group = group
        if enc is None:
            self.ex_tokens.extend((self.n_tokens, 0, 0, -1))
            self.flags.append(0)
        else:
            p, c, r = len(enc.prompt), len(enc.chosen), len(enc.rejected) if enc.rejected is not None else -1
            self.ex_tokens.extend((self.n_tokens, p, c, r))
            self.flags.append(PROMPT_CUT * enc.prompt_cut + RESPONSE_CUT * enc.response_cut)
            self.pending += (enc.prompt, enc.chosen) if r < 0 else (enc.prompt, enc.chosen, enc.rejected)
            n = p + c + max(r, 0)
            self.pending_n += n
            self.n_tokens += n
            if self.pending_n >= 1 << 20:
                self._flush()
        self.ex_text.extend((self._string(ex.prompt), self._string(ex.chosen), self._string(ex.rejected)))
        data = ex.source.encode("utf-8", "surrogatepass")
        self.source_file.write(data)
        self.source_off.append(self.source_off[-1] + len(data))
        self.group.append(group)
        if ex.order is None:
            raise ValueError(f"{ex.source}: an example without its place in the reference order")
        self.order.extend(ex.order)

    def _flush(self) -> None:
        if self.pending:
            block = np.concatenate(self.pending).astype(np.int32, copy=False)
            self.out.write(block.data)
            self.fp_tokens.update(block.data)
            self.pending, self.pending_n = [], 0

    def finish(self, meta: dict[str, Any], order_sizes: list[int]) -> None:
        """Write the index, strings and header; fsync; rename into place (atomic). ``order_sizes``: the
        reference iterator's entries' row counts (``DataReport.order_sizes``, kept out of the header)."""
        if self.n_tokens % 2:  # one padding id keeps the 8-byte arrays after it aligned
            self.pending.append(np.zeros(1, np.int32))
        self._flush()
        n_tok = self.n_tokens + self.n_tokens % 2
        arrays = {
            "example_tokens": np.frombuffer(self.ex_tokens, np.int64).reshape(-1, 4),
            "example_text": np.frombuffer(self.ex_text, np.int64).reshape(-1, 3),
            "text_offsets": np.frombuffer(self.text_off, np.int64),
            "source_offsets": np.frombuffer(self.source_off, np.int64),
            "example_group": np.frombuffer(self.group, np.int32),
            "example_order": np.frombuffer(self.order, np.int32).reshape(-1, 2),
            "order_sizes": np.asarray(order_sizes, np.int32),
            "example_flags": np.frombuffer(self.flags, np.uint8)}
        fingerprint = hashlib.sha256(json.dumps([meta["dataset"], meta["split"], meta["sft"], meta["truncation_mode"],
                                                 meta["n_groups"], meta["tokenized"]]).encode())
        fingerprint.update(self.fp_tokens.digest() + self.fp_text.digest())
        for name in ("example_tokens", "example_text", "text_offsets", "example_group", "example_order", "order_sizes",
                     "example_flags"):
            fingerprint.update(arrays[name].tobytes())
        meta = {**meta, "examples": len(arrays["example_group"]), "tokens": self.n_tokens,
                "index_sha256": index_digest(arrays), "fingerprint": fingerprint.hexdigest()}
        header: dict[str, Any] = {}
        offset = 0
        for name, dtype, cols in LAYOUT:
            if name == "tokens":
                shape, nbytes = [n_tok], 4 * n_tok
            elif name in ("text", "source"):
                f = self.text_file if name == "text" else self.source_file
                nbytes = f.seek(0, os.SEEK_END)
                shape = [nbytes]
            else:
                shape, nbytes = list(arrays[name].shape), arrays[name].nbytes
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            if name in arrays:
                self.out.write(arrays[name].tobytes())
            elif name != "tokens":
                f.seek(0)
                shutil.copyfileobj(f, self.out, 1 << 22)
        header["__metadata__"] = {"caldpo": json.dumps(meta, sort_keys=True)}
        raw = json.dumps(header).encode()
        if len(raw) > HEADER_RESERVE:
            raise RuntimeError(f"token cache header of {len(raw)} bytes exceeds its {HEADER_RESERVE}-byte reserve")
        self.out.seek(0)
        self.out.write(HEADER_RESERVE.to_bytes(8, "little") + raw + b" " * (HEADER_RESERVE - len(raw)))
        self.out.flush()
        os.fsync(self.out.fileno())
        self.close()
        os.replace(self.tmp, self.file)
        with contextlib.suppress(OSError):
            fd = os.open(self.file.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self, remove: bool = False) -> None:
        for f in (self.out, self.text_file, self.source_file):
            if f is None:
                continue
            if remove:
                with contextlib.suppress(OSError):  # flushing into a full disk: the file goes anyway
                    f.close()
            else:
                f.close()
        for p in (self.tmp.with_name(self.tmp.name + ".text"), self.tmp.with_name(self.tmp.name + ".source"),
                  *([self.tmp] if remove else [])):
            with contextlib.suppress(OSError):
                p.unlink()


def index_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the index arrays (``INDEX``: names, shapes and bytes)."""
    h = hashlib.sha256()
    for name in INDEX:
        a = arrays[name]
        h.update(f"{name}:{a.dtype}:{a.shape};".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a split's objects pile up (it would walk them again and again)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _bar(total: int | None, desc: str, unit: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not show, dynamic_ncols=True, leave=False,
                mininterval=0.5, unit_scale=True)


def build(file: Path, spec: SplitSpec, parts: dict[str, Any] | None, tokenizer, *, rows: int | None = None,
          show_progress: bool = False) -> None:
    """Load the split's rows (``data.load_dataset``), tokenize them (``batches.tokenize_examples``) and
    write the table, its data and token reports included, to ``file`` (atomically).

    The work runs in a child Python process (``python -m caldpo.train.tokens``) that imports no torch:
    every row's text is held at once while the rows are grouped by prompt, and that memory is the
    child's and goes back to the system when it exits, instead of staying in the trainer's process
    for the whole run. A tokenizer that cannot be pickled, or that does not come back the same (its
    ``tokenizer_digest``), and a hub dataset (the ``datasets`` library's setup is this process's) are
    built in this process instead. Raises DataError / batches.ExampleError
    for bad data, as loading does (rebuilt from the child's report), RuntimeError when the child
    fails otherwise (its traceback is on stderr)."""
    hub = local_source(spec.dataset, spec.split, spec.path) is None  # the datasets library's state is here
    if hub or not _build_in_child(file, spec, parts, tokenizer, rows, show_progress):
        build_here(file, spec, parts, tokenizer, rows=rows, show_progress=show_progress)


_TOKENIZER_DIFFERS = 4  # the child's exit status when the tokenizer did not survive pickling unchanged
_DATA_ERROR = 3
_NO_SPACE = 5  # ... when the disk filled while it wrote the table
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write failed for want of room


def _build_in_child(file: Path, spec: SplitSpec, parts, tokenizer, rows, show_progress: bool) -> bool:
    """``build`` in a child process; False when the tokenizer cannot go there (build in this one)."""
    import pickle
    import subprocess

    digest_ = tokenizer_digest(tokenizer) if tokenizer is not None else None
    with tempfile.TemporaryDirectory(prefix=".build-", dir=file.parent) as tmp:
        request = Path(tmp) / "request.json"
        try:
            with open(Path(tmp) / "tokenizer.pkl", "wb") as f:
                pickle.dump(tokenizer, f)
        except Exception:  # noqa: BLE001 - an unpicklable tokenizer is used in this process
            return False
        request.write_text(json.dumps({
            "file": str(file), "spec": dataclasses.asdict(spec), "parts": parts, "rows": rows,
            "show_progress": show_progress, "tokenizer": str(Path(tmp) / "tokenizer.pkl"),
            "tokenizer_digest": digest_, "error": str(Path(tmp) / "error.json")}))
        root = str(Path(__file__).resolve().parents[2])  # the folder holding this caldpo (not ``caldpo.__file__``:
        # a folder named caldpo in the working directory, e.g. a clone's, makes ``caldpo`` a namespace package)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        sys.stdout.flush()
        sys.stderr.flush()
        child = subprocess.Popen([sys.executable, "-m", "caldpo.train.tokens", str(request)], env=env)
        try:
            status = child.wait()
        except BaseException:
            child.kill()
            child.wait()
            raise
        if status == 0:
            return True
        if status == _TOKENIZER_DIFFERS:
            log.debug("the tokenizer does not pickle unchanged: tokenizing %s in this process", spec.name)
            return False
        error = Path(tmp) / "error.json"
        if status == _DATA_ERROR and error.exists():
            raise _data_error(json.loads(error.read_text()))
        if status == _NO_SPACE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        raise RuntimeError(f"tokenizing {spec.name} in a child process failed (exit {status}; its output is above)")


def _data_error(d: dict) -> Exception:
    """The DataError (or batches.ExampleError) a child process reported, as it was raised there."""
    from .batches import ExampleError

    if d["type"] == "ExampleError":
        e = ExampleError(d["source"], d["what"], d["reason"], d["hint"])
    else:
        e = DataError(d["source"], d["line"], d["what"], d["unit"], hint=d["hint"], reason=d["reason"])
    e.option = d["option"]
    return e


def _child_main(request_path: str) -> int:
    """``python -m caldpo.train.tokens REQUEST``: run one ``build_here`` for the parent (``build``)."""
    import pickle

    req = json.loads(Path(request_path).read_text())
    with open(req["tokenizer"], "rb") as f:
        tokenizer = pickle.load(f)
    if tokenizer is not None and tokenizer_digest(tokenizer) != req["tokenizer_digest"]:
        return _TOKENIZER_DIFFERS
    try:
        build_here(Path(req["file"]), SplitSpec(**req["spec"]), req["parts"], tokenizer, rows=req["rows"],
                   show_progress=req["show_progress"])
    except DataError as e:
        fields = {k: getattr(e, k, None) for k in ("source", "line", "what", "unit", "option", "hint", "reason")}
        Path(req["error"]).write_text(json.dumps({"type": type(e).__name__, **fields}))
        return _DATA_ERROR
    except OSError as e:
        if e.errno in _FULL:
            return _NO_SPACE  # the parent says it in one line (and builds elsewhere)
        raise
    return 0


def _in_order(groups: dict, sft: bool, order: deque) -> Iterator[Example]:
    """The examples of ``groups`` in ``batches.flatten``'s order, one group at a time, each group let go
    once its examples are out (the memory of the rows' texts shrinks as the split is written); appends
    (the group's prompt object, its number) to ``order`` as each group starts. Empties ``groups``."""
    listed = list(groups.values())
    groups.clear()
    for k in range(len(listed)):
        g, listed[k] = listed[k], None
        order.append((g.prompt, k))
        yield from flatten({g.prompt: g}, sft=sft)


def build_here(file: Path, spec: SplitSpec, parts: dict[str, Any] | None, tokenizer, *, rows: int | None = None,
               show_progress: bool = False) -> None:
    """``build`` in this process."""
    writer = _Writer(file)
    try:
        with _gc_paused():
            with _bar(rows, f"rows {spec.name}", " rows", show_progress) as bar:
                groups, report = load_dataset(
                    spec.dataset, spec.split, sft=spec.sft, path=spec.path, on_error=spec.on_error,
                    cache_dir=spec.hub_cache_dir, held_out=spec.held_out, max_row_bytes=spec.max_row_bytes,
                    on_row=bar.update)
            n_groups = len(groups)
            n_examples = sum(1 if spec.sft else len(g.pairs) for g in groups.values())
            order: deque = deque()
            examples = _in_order(groups, spec.sft, order)

            def group_of(ex: Example) -> int:  # the group whose prompt object the example holds
                while order[0][0] is not ex.prompt:
                    order.popleft()
                return order[0][1]

            token_report = None
            if tokenizer is not None:
                token_report = TokenReport(spec.dataset, spec.split, spec.max_length, spec.max_prompt_length)
                with _bar(n_examples, f"tokenize {spec.name}", " ex", show_progress) as bar:
                    for ex, enc in tokenize_examples(examples, tokenizer, max_length=spec.max_length,
                                                     max_prompt_length=spec.max_prompt_length, report=token_report,
                                                     on_error=spec.on_error, progress=bar.update):
                        writer.add(ex, group_of(ex), enc)
            else:
                for ex in examples:
                    writer.add(ex, group_of(ex), None)
            meta = {"format": FORMAT, "key": digest(parts) if parts is not None else None, "key_parts": parts,
                    "dataset": spec.dataset, "split": spec.split, "sft": spec.sft,
                    "truncation_mode": TRUNCATION_MODE[spec.dataset], "n_groups": n_groups,
                    "tokenized": tokenizer is not None,
                    "data_report": {**dataclasses.asdict(report), "order_sizes": []},  # an array of its own
                    "token_report": dataclasses.asdict(token_report) if token_report is not None else None}
            writer.finish(meta, report.order_sizes)
    except BaseException:
        writer.close(remove=True)
        raise


# ----------------------------------------------------------------------------- reading


def _problem(header: dict, meta: dict, size: int, data_start: int, key: str | None) -> str | None:
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')!r}, not {FORMAT}"
    if key is not None and meta.get("key") != key:
        return "its key differs from the file name's"
    offset = 0
    for name, dtype, cols in LAYOUT:
        entry = header.get(name)
        if not isinstance(entry, dict) or entry.get("dtype") != ST_DTYPES[dtype]:
            return f"array {name!r} missing or not {dtype}"
        shape, (begin, end) = entry["shape"], entry["data_offsets"]
        if begin != offset or end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize \
                or (cols is not None and (len(shape) != 2 or shape[1] != cols)):
            return f"array {name!r}: shape {shape} and byte range [{begin}, {end}) disagree"
        offset = end
    if data_start + offset != size:
        return f"{size} bytes on disk, its header describes {data_start + offset} (cut short or appended to)"
    return None


def _bounds_problem(a: dict[str, np.ndarray], meta: dict) -> str | None:
    n = len(a["example_group"])
    if not (len(a["example_tokens"]) == len(a["example_text"]) == len(a["example_flags"]) == n
            and len(a["source_offsets"]) == n + 1 and n == meta.get("examples")):
        return "the per-example arrays disagree on the number of examples"
    for name, blob in (("text_offsets", "text"), ("source_offsets", "source")):
        off = a[name]
        if len(off) == 0 or off[0] != 0 or off[-1] != len(a[blob]) or (np.diff(off) < 0).any():
            return f"{name} do not cut {blob} into strings"
    t = a["example_tokens"]
    if n and ((t[:, :3] < 0).any() or (t[:, 3] < -1).any()
              or (t[:, 0] + t[:, 1] + t[:, 2] + np.maximum(t[:, 3], 0) > len(a["tokens"])).any()):
        return "token ranges out of bounds"
    s = a["example_text"]
    if n and ((s < -1).any() or (s[:, :2] < 0).any() or (s >= len(a["text_offsets"]) - 1).any()):
        return "string numbers out of bounds"
    if n and ((a["example_group"] < 0).any() or (a["example_group"] >= int(meta["n_groups"])).any()):
        return "prompt groups out of bounds"
    o, sizes = a["example_order"], a["order_sizes"]
    if len(o) != n or (sizes < 1).any():
        return "the reference order's arrays disagree with the examples"
    if n and ((o[:, 0] < 0).any() or (o[:, 0] >= len(sizes)).any()
              or (o[:, 1] < 0).any() or (o[:, 1] >= sizes[np.clip(o[:, 0], 0, max(len(sizes) - 1, 0))]).any()):
        return "places in the reference order out of bounds"
    return None


def read_table(file: Path, key: str | None = None) -> tuple[SplitTable | None, str | None]:
    """(the table mapped from ``file``, None) if it passes every check, else (None, why not).

    Checks: a safetensors header within the file, caldpo's format and (given) ``key``, each array's
    dtype, shape and byte range, the file's exact size, the index's sha256, and the index's bounds
    (token ranges inside ``tokens``, string offsets and numbers, prompt groups). Token ids and text
    bytes are not read here (the fingerprint stored with them covers them at build time).
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, 1 << 24):
                return None, f"{size} bytes: no safetensors header"
            header = json.loads(f.read(n))
            meta = json.loads(header.get("__metadata__", {}).get("caldpo", "null"))
            if not isinstance(meta, dict):
                return None, "not a caldpo token file"
            problem = _problem(header, meta, size, 8 + n, key)
            if problem:
                return None, problem
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError, TypeError, KeyError) as e:  # unreadable, bad JSON, malformed entries
        return None, f"unreadable ({type(e).__name__}: {e})"
    arrays = {}
    for name, dtype, cols in LAYOUT:
        begin, end = header[name]["data_offsets"]
        count = (end - begin) // np.dtype(dtype).itemsize
        a = np.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + begin) if count else np.zeros(0, dtype)
        arrays[name] = a.reshape(-1, cols) if cols else a
    if index_digest(arrays) != meta.get("index_sha256"):
        return None, "the index's sha256 differs from the one stored with it (bytes changed on disk)"
    problem = _bounds_problem(arrays, meta)
    if problem:
        return None, problem
    try:
        return SplitTable(arrays, meta, file), None
    except (KeyError, TypeError) as e:
        return None, f"metadata incomplete ({type(e).__name__}: {e})"


# ----------------------------------------------------------------------------- the protocol


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) for this process, waiting for other holders."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here: the atomic rename still keeps readers safe
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _what_changed(directory: Path, stem: str, parts: dict[str, Any]) -> str:
    """``"kept beside <file>, which differs in: <what>"`` for the newest other cache file of the same data
    location and split ('' if none): a new file, not a warning (the other stays for whoever uses it)."""
    others = sorted(directory.glob(f"{stem}-*{SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for other in others:
        try:
            with open(other, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                old = json.loads(json.loads(f.read(min(n, 1 << 24)))["__metadata__"]["caldpo"])["key_parts"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        names = {"source": "the data files", "code": "caldpo's data code", "tokenizer": "the tokenizer"}
        diff = [names.get(k, f"{k} {old.get(k)} -> {parts.get(k)}") for k in sorted(parts) if old.get(k) != parts.get(k)]
        return f"kept beside {other.name}, which differs in: {', '.join(diff) or 'nothing it records'}"
    return ""


def _open_or_build(spec: SplitSpec, tokenizer, directory: Path | None, *, show_progress: bool,
                   announce: bool, rank: int = 0) -> SplitTable:
    """The split's table from the cache, else built (one log line saying why), under the split's lock.
    ``rank`` > 0: a rank after rank 0 loaded the split; building here too is worth a warning."""
    parts, rows = key_parts(spec, tokenizer)
    if parts is None or directory is None:
        return _build_uncached(spec, parts, tokenizer, rows, show_progress)
    key = digest(parts)
    stem = cache_stem(spec)
    file = directory / f"{stem}-{key[:16]}{SUFFIX}"
    table, problem = read_table(file, key) if file.exists() else (None, None)
    if table is None:
        with contextlib.ExitStack() as stack:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                stack.enter_context(_locked(directory / f"{stem}.lock"))
            except OSError as e:
                if announce or rank:
                    log.warning("%stoken cache %s cannot be written (%s): tokenizing %s without caching it",
                                f"rank {rank}: " if rank else "", directory, e.strerror or e, spec.name)
                return _build_uncached(spec, parts, tokenizer, rows, show_progress)
            table, problem = read_table(file, key) if file.exists() else (None, problem)  # built meanwhile?
            if table is None:
                damaged = problem is not None
                if announce and damaged:
                    log.warning("token cache %s is damaged (%s): rebuilding it", file, problem)
                changed = "" if damaged else _what_changed(directory, stem, parts)
                t = time.perf_counter()
                try:
                    build(file, spec, parts, tokenizer, rows=rows, show_progress=show_progress)
                except OSError as e:
                    if e.errno not in _FULL:
                        raise
                    log.warning("%stoken cache %s: %s (%s): tokenizing %s without caching it",
                                f"rank {rank}: " if rank else "", directory, os_reason(e), free_space(directory),
                                spec.name)
                    return _build_uncached(spec, parts, tokenizer, rows, show_progress)
                table, problem = read_table(file, key)
                if table is None:
                    raise RuntimeError(f"token cache {file} fails its checks right after it was written: {problem}")
                if announce and not damaged:  # after the build: a data error stays the one line a failed load prints
                    log.info("tokenized %s once into %s (%.1f s)%s", spec.name, file, time.perf_counter() - t,
                             f"; {changed}" if changed else "")
                if rank:
                    log.warning("rank %d: %s was not there after rank 0 loaded %s (a cache folder of this node's "
                                "own?): tokenized it on this rank too", rank, file, spec.name)
    return table


def _build_uncached(spec: SplitSpec, parts, tokenizer, rows, show_progress: bool) -> SplitTable:
    """Build into a temporary file, map it and delete its name (the mapping stays until the process ends).
    Raises OutputError (exit status 3) when the temporary folder has no room either."""
    with tempfile.TemporaryDirectory(prefix="caldpo-tokens-") as tmp:
        file = Path(tmp) / f"{cache_stem(spec)}{SUFFIX}"
        try:
            build(file, spec, parts, tokenizer, rows=rows, show_progress=show_progress)
        except OSError as e:
            if e.errno not in _FULL:
                raise
            raise OutputError(f"tokenizing {spec.name}: writing its token table in {tmp} failed: {os_reason(e)} "
                              f"({free_space(Path(tmp))}); free space there or in the token cache folder, or "
                              "point data.token_cache_dir (or TMPDIR) at a folder with room") from None
        table, problem = read_table(file)
        if table is None:
            raise RuntimeError(f"token table {file} fails its checks right after it was written: {problem}")
        table.path = None
        return table


def load_split(spec: SplitSpec, tokenizer, *, cache_dir: str | None = None, process=None,
               verbose: bool = False) -> SplitTable:
    """The split's ``SplitTable``: mapped from the token cache, or built once and cached.

    cache_dir: the cache folder (None: ``default_cache_dir()``; unwritable: built without caching, one
    warning). process: the trainer's ``distributed.Process``; with several ranks, rank 0 loads or builds
    first while the others wait, then they map its file (a rank that cannot see it builds its own under
    the lock), and all ranks check that they hold the same examples (fingerprints). verbose: print the
    data and token reports (and show progress bars on a terminal). Raises DataError / ExampleError for
    bad data (on every rank when rank 0 hit it), ConfigError when ranks hold different examples.
    """
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    show = verbose and sys.stderr.isatty()
    if process is None or not process.distributed:
        table = _open_or_build(spec, tokenizer, directory, show_progress=show, announce=True)
        _print_reports(table, verbose)
        return table
    from .config import ConfigError

    table, error = None, None
    if process.is_main:
        try:
            table = _open_or_build(spec, tokenizer, directory, show_progress=show, announce=True)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, then it is raised here
            error = e
    failed = process.from_main(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if failed is not None:
        raise DataError(f"rank 0 loading {spec.name}", None, failed) if failed.startswith(
            ("DataError", "ExampleError")) else RuntimeError(f"rank 0 failed to load {spec.name}: {failed}")
    if not process.is_main:
        table = _open_or_build(spec, tokenizer, directory, show_progress=False, announce=False, rank=process.rank)
    differs = process.from_main(table.fingerprint) != table.fingerprint
    if process.any(differs):
        raise ConfigError(f"{spec.option}: the ranks hold different {spec.name} examples (fingerprints differ): "
                          "give every rank the same data files")
    _print_reports(table, verbose)
    return table


def _print_reports(table: SplitTable, verbose: bool) -> None:
    """The data report and the token report, from the table: the same lines cold and warm."""
    if verbose:
        print(str(table.data_report), flush=True)
        if table.token_report is not None:
            print(str(table.token_report), flush=True)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
