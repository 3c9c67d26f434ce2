"""Preference and SFT data: Anthropic HH, TL;DR comparisons, TL;DR filtered SFT, the shipped sample.

Every source (hub split, .jsonl, .jsonl.gz, .json, .parquet) goes through the same
row parsers, which turn rows into prompt groups and count what they did in a
:class:`DataReport`. Rules (those of the reference data module, ``preference_datasets``):

HH
  * prompt = the longest prefix shared by ``chosen`` and ``rejected`` that ends with
    ``"\\n\\nAssistant:"``; responses are the remainders (they start with a space).
    For ordinary rows this is ``chosen`` up to and including its last Assistant tag,
    as in the reference code. Rows where the two differ (one side has two Assistant
    turns in a row) are counted as ``prompt_not_shared``; the reference code would
    slice ``rejected`` at chosen's prompt length and mis-split them.
  * empty final replies (``"\\n\\nAssistant: "``) are kept (the response is the text
    that is there, a lone space) and counted as ``empty_final_reply``.
  * a row with no ``"\\n\\nAssistant:"`` in its shared prefix is broken.

TL;DR comparisons
  * prompt ``"SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:"``; a
    subreddit already written ``r/x`` is not prefixed twice (``subreddit_has_r_prefix``).
  * chosen = ``" " + summaries[choice].text.strip()``, rejected the other summary;
    summaries stored without the leading space are counted
    (``summary_without_leading_space``) and get the same normalisation. ``note`` is unused.
  * CNN/DM rows (``info.article`` set, no ``post``): dropped and counted as
    ``cnndm_dropped``. They are OpenAI's out-of-domain transfer set (news articles,
    only in the validation split); the Reddit template cannot hold them and mixing
    them into the test split would change what the TL;DR evaluation measures.
  * ``choice`` not 0/1 or ``summaries`` not two texts: broken.

All datasets
  * ``chosen == rejected``: no preference signal, and Cal-DPO's two calibration
    targets would pull one text both ways; dropped and counted (``identical_pair_dropped``).
    With ``sft=True`` the row still provides its prompt's SFT target.
  * the order the trainer shuffles is the reference iterator's, whose units are not always
    these groups: each row also gets its reference group (``_Groups.slot``: HH's prompt as the
    reference code cuts it from ``chosen``; every TL;DR row its own), rows dropped here included.
  * pairs are grouped by prompt in order of first appearance; equal responses within
    a group are stored once; the SFT target is the chosen response of the prompt's
    first row (the reference code keeps the last one's; they differ only for prompts
    with several rows). Repeated and reversed pairs (several raters) are kept and counted.
  * structurally broken rows (bad JSON, missing or mistyped field, undecodable bytes,
    truncated .gz) raise :class:`DataError` naming file and line, or with
    ``on_error="skip"`` are skipped and counted by reason.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASETS = ("hh", "tldr", "sample")
SPLITS = ("train", "test")
HH_HUB = "Anthropic/hh-rlhf"
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
TLDR_PREF_HUB = ("openai/summarize_from_feedback", "comparisons")
TLDR_PREF_HUB_SPLIT = {"train": "train", "test": "validation"}
TLDR_SFT_HUB = "UCL-DARK/openai-tldr-filtered"
TLDR_SPLITS = {"train": ("train",), "test": ("valid1", "valid2")}  # comparison row["split"] per split
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
ASSISTANT = "\n\nAssistant:"
TRUNCATION_MODE = {"hh": "keep_end", "sample": "keep_end", "tldr": "keep_start"}
MAX_ROW_BYTES = 4 << 20  # data.max_row_bytes' default: the largest real HH / TL;DR rows are tens of KB


@dataclass
class PromptGroup:
    """All responses to one prompt and the preferences among them."""

    prompt: str
    responses: list[str]
    pairs: list[tuple[int, int]]  # (preferred idx, dispreferred idx) into responses
    sft_target: str
    truncation_mode: str  # "keep_end" (HH, sample) or "keep_start" (TL;DR)
    # provenance, not content (groups from different files compare equal):
    pair_sources: list[str] = field(default_factory=list, compare=False)  # parallel to pairs: Record.where of each pair's row
    sft_source: str = field(default="", compare=False)  # Record.where of the row that gave sft_target
    # where each pair (and the SFT target) stands in the reference iterator's order, (entry, rank in it):
    pair_order: list[tuple[int, int]] = field(default_factory=list, compare=False)  # parallel to pairs
    sft_order: tuple[int, int] | None = field(default=None, compare=False)


class CountReport:
    """What the load-time reports share (``DataReport``, ``batches.TokenReport``): counts by reason in
    dicts, ``skipped`` among them (rows skipped by reason), each printed as ``k=v, ...`` sorted by key
    (``none`` when empty) in the report's one-line ``str()``."""

    skipped: dict[str, int]

    @staticmethod
    def add(counts: dict[str, int], key: str, n: int = 1) -> None:
        counts[key] = counts.get(key, 0) + n

    def skip(self, reason: str, n: int = 1) -> None:
        self.add(self.skipped, reason, n)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    @staticmethod
    def fmt(d: dict[str, int]) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(d.items())) or "none"


@dataclass
class DataReport(CountReport):
    """What loading a dataset read, kept, counted and skipped; printed when it loads."""

    dataset: str
    split: str
    source: str
    rows_read: int = 0
    prompts: int = 0
    pairs: int = 0
    anomalies: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    split_rule: str = ""  # how this split's rows were chosen (load_dataset); printed when set
    # rows of each of the reference iterator's entries (its shuffle units, _Groups.slot) in this split,
    # dropped rows included; not printed
    order_sizes: list[int] = field(default_factory=list)

    def count(self, rule: str, n: int = 1) -> None:
        self.add(self.anomalies, rule, n)

    def __str__(self) -> str:
        return (f"data {self.dataset}/{self.split} from {self.source}: {self.rows_read} rows -> "
                f"{self.prompts} prompts, {self.pairs} pairs; rules applied: {self.fmt(self.anomalies)}; "
                f"rows skipped: {self.fmt(self.skipped)}" + (f"; split: {self.split_rule}" if self.split_rule else ""))


class DataError(ValueError):
    """Data that cannot be used: a broken row, a missing or empty split, a folder with no data files.

    ``str(e)`` is one line: ``"[option: ]source[:line]: what[; hint]"``. ``source`` is the file
    (or hub split), ``line`` its 1-based line (``unit`` "item"/"row" for JSON arrays and
    parquet; None for a whole-file fault), ``option`` the config key that named the data
    (``data.paths.hh``; set by :func:`load_dataset`), ``hint`` what to do, ``reason`` the
    skip-count key of a broken row.
    """

    def __init__(self, source: str, line: int | None, what: str, unit: str = "line", *,
                 option: str | None = None, hint: str = "", reason: str = ""):
        self.source, self.line, self.what, self.unit = source, line, what, unit
        self.option, self.hint, self.reason = option, hint, reason
        super().__init__(what)

    def __str__(self) -> str:
        loc = self.source if self.line is None else (
            f"{self.source}:{self.line}" if self.unit == "line" else f"{self.source} {self.unit} {self.line}")
        return f"{self.option + ': ' if self.option else ''}{loc}: {self.what}{'; ' + self.hint if self.hint else ''}"


class RowError(Exception):
    """A broken row inside a parser; the reader turns it into DataError or a skip count."""

    def __init__(self, reason: str, what: str):
        super().__init__(what)
        self.reason, self.what = reason, what


# ----------------------------------------------------------------------------- records


@dataclass
class Record:
    """One raw row and where it came from (a RowError if it could not be decoded)."""

    source: str
    line: int
    row: Any
    unit: str = "line"
    ref: str = ""  # provenance when not source + line (hub rows)

    @property
    def where(self) -> str:
        """Where the row came from: ``"path:line"`` (JSON lines), ``"path item N"`` (a JSON
        array's 1-based item), ``"path row N"`` (parquet), ``"hub-name/split:row"`` (hub, 0-based)."""
        if self.ref:
            return self.ref
        return f"{self.source}:{self.line}" if self.unit == "line" else f"{self.source} {self.unit} {self.line}"


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _too_large(size: int, limit: int) -> RowError:
    return RowError("row_too_large", f"row of {size:,} bytes is larger than data.max_row_bytes={limit:,} (no "
                    "preference pair is that long; raise data.max_row_bytes if such rows are genuine)")


def value_bytes(value: Any) -> int:
    """Approximate size of a decoded row: UTF-8 bytes of its strings plus 8 per other scalar, nested."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(len(k) + value_bytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(value_bytes(v) for v in value)
    return len(value) if isinstance(value, (bytes, bytearray)) else 8


def _iter_json_lines(path: Path, max_row_bytes: int) -> Iterator[Record]:
    """Rows of a JSON-lines file; a line longer than ``max_row_bytes`` is reported by its size without
    ever being held whole (it is read in bounded pieces and skipped)."""
    src = str(path)
    line_no = 0
    with _open_bytes(path) as f:
        while True:
            try:
                raw = f.readline(max_row_bytes + 2)  # the row, its newline (and a \r) at most
                size = None
                if len(raw) == max_row_bytes + 2 and not raw.endswith(b"\n"):
                    size = len(raw)  # longer than the bound: count the rest of the line, hold none of it
                    while raw and not raw.endswith(b"\n"):
                        raw = f.readline(1 << 20)
                        size += len(raw)
            except (EOFError, OSError, zlib.error) as e:  # truncated or corrupt .gz
                yield Record(src, line_no + 1, RowError("corrupt_file", f"file ends or is corrupt here ({e})"))
                return
            if not raw and size is None:
                return
            line_no += 1
            if size is not None or len(raw.rstrip(b"\r\n")) > max_row_bytes:
                size = len(raw.rstrip(b"\r\n")) if size is None else size - (1 if raw.endswith(b"\n") else 0)
                yield Record(src, line_no, _too_large(size, max_row_bytes))
                continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Record(src, line_no, RowError("undecodable", f"not UTF-8 ({e})"))
                continue
            try:
                yield Record(src, line_no, json.loads(text))
            except json.JSONDecodeError as e:
                # the decoder counts lines within this one line: say where in the line instead
                row = text.rstrip("\r\n")
                where = "the end of the line" if e.pos >= len(row) else f"character {e.pos + 1}"
                yield Record(src, line_no, RowError("bad_json", f"bad JSON ({e.msg} at {where})"))


_SPACE = re.compile(r"[ \t\n\r]*")


def _iter_json_array(path: Path, max_row_bytes: int) -> Iterator[Record]:
    """Items of a file holding one JSON array. The file is read whole; each item is decoded on its
    own and one whose text is longer than ``max_row_bytes`` is replaced by its size at once."""
    src = str(path)
    try:
        with _open_bytes(path) as f:
            text = f.read().decode("utf-8")
        decoder, items = json.JSONDecoder(), []
        pos = _SPACE.match(text).end()
        if not text.startswith("[", pos):
            raise json.JSONDecodeError("Expecting '['", text, pos)
        pos = _SPACE.match(text, pos + 1).end()
        while not text.startswith("]", pos):
            if items:
                if not text.startswith(",", pos):
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
                pos = _SPACE.match(text, pos + 1).end()
            item, end = decoder.raw_decode(text, pos)
            size = end - pos if text.isascii() else len(text[pos:end].encode("utf-8", "surrogatepass"))
            items.append(_too_large(size, max_row_bytes) if size > max_row_bytes else item)
            pos = _SPACE.match(text, end).end()
        if _SPACE.match(text, pos + 1).end() != len(text):
            raise json.JSONDecodeError("Extra data", text, _SPACE.match(text, pos + 1).end())
    except UnicodeDecodeError as e:
        yield Record(src, 1, RowError("undecodable", f"not UTF-8 ({e})"))
        return
    except json.JSONDecodeError as e:
        yield Record(src, e.lineno, RowError("bad_json", f"bad JSON ({e})"))
        return
    except (EOFError, OSError, zlib.error) as e:
        yield Record(src, 1, RowError("corrupt_file", f"file is truncated or corrupt ({e})"))
        return
    for i, item in enumerate(items, 1):
        yield Record(src, i, item, unit="item")


def _starts_with_array(path: Path) -> bool:
    try:
        with _open_bytes(path) as f:
            head = f.read(4096)
    except (EOFError, OSError, zlib.error):
        return False  # the line reader reports the corruption with its position
    return head.lstrip().startswith(b"[")


def _bounded(row: Any, max_row_bytes: int) -> Any:
    size = value_bytes(row)
    return _too_large(size, max_row_bytes) if size > max_row_bytes else row


def iter_file(path: str | Path, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[Record]:
    """Rows of a .jsonl/.json (JSON lines or one array)/.parquet file, optionally gzipped.

    A row larger than ``max_row_bytes`` comes as a ``row_too_large`` RowError with its size: a JSON
    line before it is decoded (its bytes, newline excluded), an array item by its text, a parquet
    row by ``value_bytes`` as soon as it is decoded.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        i = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                i += 1
                yield Record(str(path), i, _bounded(row, max_row_bytes), unit="row")
    elif name.endswith((".json", ".json.gz")) and _starts_with_array(path):
        yield from _iter_json_array(path, max_row_bytes)
    else:
        yield from _iter_json_lines(path, max_row_bytes)


def iter_hub(name: str, config: str | None, split: str, cache_dir: str | None,
             max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[Record]:
    """Rows of a hub split; ``line`` is the 0-based row index (``ds[line]``); a row larger than
    ``max_row_bytes`` (``value_bytes``) comes as a ``row_too_large`` RowError."""
    import datasets as hf_datasets

    args = (name, config) if config else (name,)
    ds = hf_datasets.load_dataset(*args, split=split, cache_dir=cache_dir)
    src = f"hub:{name}{'/' + config if config else ''}[{split}]"
    ref = f"{name}{'/' + config if config else ''}/{split}"
    for i, row in enumerate(ds):
        yield Record(src, i, _bounded(row, max_row_bytes), unit="row", ref=f"{ref}:{i}")


# ----------------------------------------------------------------------------- row parsers


def _field(row: Any, key: str, typ: type | tuple[type, ...], where: str = "") -> Any:
    if not isinstance(row, dict):
        raise RowError("wrong_type", f"expected a JSON object{where}, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise RowError("missing_field", f"missing field {where}{key!r}")
    value = row[key]
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise RowError("wrong_type", f"field {where}{key!r} should be {names}, got {type(value).__name__}")
    return value


def _common_prefix_len(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # largest n with a[:n] == b[:n]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str, bool]:
    """(prompt, chosen response, rejected response, prompt_not_shared) for one HH row."""
    k = chosen.rfind(ASSISTANT)
    if k < 0:
        raise RowError("no_assistant_turn", "'chosen' has no '\\n\\nAssistant:' turn")
    end = k + len(ASSISTANT)
    if rejected.startswith(chosen[:end]):
        return chosen[:end], chosen[end:], rejected[end:], False
    k = chosen.rfind(ASSISTANT, 0, _common_prefix_len(chosen, rejected))
    if k < 0:
        raise RowError("no_assistant_turn", "'chosen' and 'rejected' share no prefix ending in '\\n\\nAssistant:'")
    end = k + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:], True


def parse_hh(row: Any, report: DataReport) -> tuple[str, str, str]:
    """An HH row ``{"chosen", "rejected"}`` -> (prompt, chosen response, rejected response)."""
    chosen = _field(row, "chosen", str)
    rejected = _field(row, "rejected", str)
    prompt, c, r, not_shared = split_hh(chosen, rejected)
    if not_shared:
        report.count("prompt_not_shared")
    if not c.strip() or not r.strip():
        report.count("empty_final_reply")
    return prompt, c, r


def tldr_prompt(subreddit: str, title: str, post: str, report: DataReport) -> str:
    """The TL;DR prompt template; a subreddit already written ``r/x`` is not prefixed again."""
    if subreddit.startswith("r/"):
        subreddit = subreddit[2:]
        report.count("subreddit_has_r_prefix")
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def parse_tldr_comparison(row: Any, report: DataReport) -> tuple[str, str, str] | None:
    """An OpenAI comparison row -> (prompt, chosen, rejected); None for a dropped CNN/DM row."""
    info = _field(row, "info", dict)
    summaries = _field(row, "summaries", list)
    choice = _field(row, "choice", int)
    if len(summaries) != 2:
        raise RowError("bad_summaries", f"'summaries' should hold 2 summaries, has {len(summaries)}")
    if choice not in (0, 1):
        raise RowError("bad_choice", f"'choice' should be 0 or 1, is {choice}")
    texts = [_field(s, "text", str, where=f"summaries[{i}].") for i, s in enumerate(summaries)]
    if info.get("post") is None and isinstance(info.get("article"), str):
        report.count("cnndm_dropped")
        return None
    prompt = tldr_prompt(_field(info, "subreddit", str, "info."), _field(info, "title", str, "info."),
                         _field(info, "post", str, "info."), report)
    for t in texts:
        if not t.startswith(" "):
            report.count("summary_without_leading_space")
    return prompt, " " + texts[choice].strip(), " " + texts[1 - choice].strip()


def parse_tldr_filtered(row: Any, report: DataReport) -> tuple[str, str]:
    """A filtered TL;DR SFT row ``{subreddit, title, post, summary}`` -> (prompt, target)."""
    prompt = tldr_prompt(_field(row, "subreddit", str), _field(row, "title", str), _field(row, "post", str), report)
    summary = _field(row, "summary", str)
    if not summary.startswith(" "):
        report.count("summary_without_leading_space")
    return prompt, " " + summary.strip()


def parse_tldr_any(row: Any, report: DataReport) -> tuple:
    """Dispatch on the row's keys: raw comparison, raw filtered SFT, or preproc output.

    Returns ("pair", prompt, chosen, rejected), ("sft", prompt, target) or ("drop",).
    """
    if not isinstance(row, dict):
        raise RowError("wrong_type", f"expected a JSON object, got {type(row).__name__}")
    if "summaries" in row or "info" in row:
        out = parse_tldr_comparison(row, report)
        return ("drop",) if out is None else ("pair", *out)
    if "summary" in row or "post" in row:
        return ("sft", *parse_tldr_filtered(row, report))
    if "target" in row:
        return "sft", _field(row, "prompt", str), _field(row, "target", str)
    if "chosen" in row or "rejected" in row:
        return "pair", _field(row, "prompt", str), _field(row, "chosen", str), _field(row, "rejected", str)
    raise RowError("unknown_format", f"unrecognised TL;DR row with keys {sorted(row)}")


def apply_row(rec: Record, report: DataReport, on_error: str, fn) -> Any:
    """Count the row and run ``fn`` on it; a broken row raises DataError or, with
    ``on_error="skip"``, is counted by reason (and None returned)."""
    report.rows_read += 1
    try:
        if isinstance(rec.row, RowError):
            raise rec.row
        return fn(rec.row)
    except RowError as e:
        if on_error == "raise":
            raise DataError(rec.source, rec.line, e.what, rec.unit, reason=e.reason) from None
        report.skip(e.reason)
        return None


# ----------------------------------------------------------------------------- grouping


class _Groups:
    """Builds prompt groups in order of first appearance, and numbers each row's reference group.

    ``per_row``: every row is its own reference group (TL;DR); otherwise (HH, the sample) a row's
    reference group is its prompt as the reference code cuts it (``slot``).
    """

    def __init__(self, truncation_mode: str, report: DataReport, sft: bool, per_row: bool = False):
        self.mode, self.report, self.sft, self.per_row = truncation_mode, report, sft, per_row
        self.groups: dict[str, PromptGroup] = {}
        self.index: dict[str, dict[str, int]] = {}
        self.seen: dict[str, set[tuple[int, int]]] = {}
        self.slots: dict[str, int] = {}
        self.sizes: list[int] = []  # rows per reference group

    def slot(self, chosen_text: str | None = None) -> tuple[int, int]:
        """(reference group, rank of this row among that group's rows) of the next row of the split,
        dropped or kept.

        The reference iterator (``preference_datasets.get_batch_iterator``) shuffles the entries of
        its ``flat_data``, one per key of the dataset loader's dict, in order of first appearance:
        for HH (``get_hh``) the prompt cut from ``chosen`` at its last ``"\\n\\nAssistant:"``
        (``chosen_text`` is that whole text), for TL;DR (``get_tldr``, keyed by row index plus
        prompt) every row. The loaders keep every row, so a row dropped here (identical pair,
        CNN/DM, repeated SFT prompt) still takes its place and the shuffle stays theirs.
        """
        key = None if self.per_row or chosen_text is None else \
            chosen_text[: chosen_text.rfind(ASSISTANT) + len(ASSISTANT)]
        slot = self.slots.get(key) if key is not None else None
        if slot is None:
            slot = len(self.sizes)
            self.sizes.append(0)
            if key is not None:
                self.slots[key] = slot
        self.sizes[slot] += 1
        return slot, self.sizes[slot] - 1

    def _group(self, prompt: str, target: str, where: str, order: tuple[int, int]) -> PromptGroup:
        g = self.groups.get(prompt)
        if g is None:
            g = self.groups[prompt] = PromptGroup(prompt, [], [], target, self.mode, [], where, sft_order=order)
            self.index[prompt], self.seen[prompt] = {}, set()
        return g

    def _response(self, prompt: str, text: str) -> int:
        idx = self.index[prompt]
        if text not in idx:
            idx[text] = len(self.groups[prompt].responses)
            self.groups[prompt].responses.append(text)
        return idx[text]

    def add_pair(self, prompt: str, chosen: str, rejected: str, where: str = "") -> None:
        order = self.slot(prompt + chosen)
        if chosen == rejected:
            self.report.count("identical_pair_dropped")
            if self.sft:
                self._response(prompt, self._group(prompt, chosen, where, order).sft_target)
            return
        g = self._group(prompt, chosen, where, order)
        pair = (self._response(prompt, chosen), self._response(prompt, rejected))
        seen = self.seen[prompt]
        if pair in seen:
            self.report.count("repeated_pair_kept")
        elif pair[::-1] in seen:
            self.report.count("reversed_pair_kept")
        seen.add(pair)
        g.pairs.append(pair)
        g.pair_sources.append(where)
        g.pair_order.append(order)

    def add_target(self, prompt: str, target: str, where: str = "") -> None:
        order = self.slot()
        if prompt in self.groups:
            self.report.count("repeated_sft_prompt_first_kept")
            return
        self._response(prompt, self._group(prompt, target, where, order).sft_target)


# ----------------------------------------------------------------------------- sources


SPLIT_STEMS = {"train": ("train",), "test": ("test", "valid", "validation")}  # in order of preference
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


def _stem(p: Path) -> str:
    name = p.name.lower()
    for suf in DATA_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return ""


def split_of_name(p: Path) -> str | None:
    """The split a data file's name gives (``train.json``, ``test.jsonl.gz``, ``valid.jsonl``,
    ``train-00000-of-00001.parquet``), as the stem's first word; None if it names none."""
    first = re.split(r"[-_.]", _stem(p), maxsplit=1)[0]
    return next((s for s, stems in SPLIT_STEMS.items() if first in stems), None)


def _data_files(d: Path, recursive: bool) -> list[Path]:
    it = d.rglob("*") if recursive else d.iterdir()
    return sorted(p for p in it if p.is_file() and _stem(p))


@dataclass
class SplitSource:
    """Which files hold one split, and how the split is picked from their rows.

    rule "files": the files are named for the split (rows carrying their own ``split``
    field still go by it); "rows": the files are not named for a split, so each row
    goes by its own ``split`` field and rows without one by the held-out cut
    (:func:`held_out_test`), or, with no cut asked for, all serve the requested split.
    """

    files: list[Path]
    rule: str  # "files" | "rows"

    def describe(self, root: Path) -> str:
        names = [str(f.relative_to(root)) if f != root and root in f.parents else str(f) for f in self.files]
        return ", ".join(names) if len(names) <= 4 else f"{len(names)} files ({names[0]}, ...)"


def split_source(path: Path, split: str, subdirs: tuple[str, ...] = ()) -> SplitSource:
    """The files of ``split`` under ``path`` (a file or a directory; ``subdirs`` are searched
    too, in order, e.g. the HH subsets). A directory holding files named for a split serves
    each split from its own files (``test`` before ``valid``/``validation``); one without such
    names serves both splits from all its data files by row (rule "rows")."""
    if path.is_file():
        return SplitSource([path], "rows")
    if not path.is_dir():
        raise DataError(str(path), None, "no such file or directory", hint="give an existing file or folder")
    named: dict[str, list[Path]] = {}
    for d in (path, *(path / s for s in subdirs)):
        if not d.is_dir():
            continue
        by_stem: dict[str, list[Path]] = {}
        for f in _data_files(d, recursive=False):
            sp = split_of_name(f)
            if sp is not None:
                by_stem.setdefault(re.split(r"[-_.]", _stem(f), maxsplit=1)[0], []).append(f)
        for sp, stems in SPLIT_STEMS.items():
            stem = next((st for st in stems if st in by_stem), None)
            if stem is not None:
                named.setdefault(sp, []).extend(_one_per_split(by_stem[stem]))
    if named:
        if split not in named:
            other = ", ".join(str(f.relative_to(path)) for fs in named.values() for f in fs)
            raise DataError(str(path), None, f"no {split} file ({'/'.join(SPLIT_STEMS[split])}"
                            f"{{{','.join(DATA_SUFFIXES)}}}) beside {other}",
                            hint=f"add the {split} split's own file; one split never serves as the other")
        return SplitSource(named[split], "files")
    files = _data_files(path, recursive=True)
    if not files:
        raise DataError(str(path), None, f"no data files ({', '.join(DATA_SUFFIXES)}) in this folder",
                        hint="point it at a folder with train/test files or at one data file")
    nested = [f for f in files if split_of_name(f) is not None]
    if nested:
        raise DataError(str(path), None, f"split files lie in a subfolder ({nested[0].relative_to(path)})",
                        hint=f"point it at {nested[0].parent}, which holds the split files")
    return SplitSource(files, "rows")


def _one_per_split(files: list[Path]) -> list[Path]:
    """Of files sharing a split name in one folder, the preferred format only (train.jsonl
    over train.jsonl.gz over train.json ...), except sharded parquet, which is all read."""
    shards = [f for f in files if f.name.lower().endswith(".parquet")]
    exact = [f for f in files if f not in shards]
    if exact:
        return [min(exact, key=lambda f: DATA_SUFFIXES.index(next(s for s in DATA_SUFFIXES if f.name.lower().endswith(s))))]
    return shards


def held_out_test(prompt: str, fraction: float) -> bool:
    """Whether a prompt falls in the held-out test cut: the first 8 bytes of sha256(prompt,
    UTF-8) read as an integer, divided by 2**64, are below ``fraction``. Deterministic,
    independent of file order, and every pair of a prompt lands in the same split."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return h / 2.0 ** 64 < fraction


def hub_source(name: str, split: str, sft: bool) -> tuple[str, str | None, str, bool]:
    """(hub name, config, hub split, rows carry their own 'split' field) of a dataset read from the hub."""
    if name in ("hh", "sample"):
        return HH_HUB, None, split, False
    if sft:
        return TLDR_SFT_HUB, None, split, False
    hub_name, config = TLDR_PREF_HUB
    return hub_name, config, TLDR_PREF_HUB_SPLIT[split], True


def local_source(name: str, split: str, path: str | None) -> tuple[SplitSource, Path] | None:
    """The local files of ``split`` (:func:`split_source`) and their root; None when the hub serves it.
    Raises DataError as ``split_source`` does, and for a missing shipped sample."""
    if name == "sample" and path is None:
        if not (SAMPLE_DIR / f"{split}.jsonl").is_file():
            raise DataError(str(SAMPLE_DIR / f"{split}.jsonl"), None, "the shipped sample is missing",
                            hint="write it with `python -m caldpo.train.sample`")
        path = str(SAMPLE_DIR)
    if path is None:
        return None
    root = Path(path)
    return split_source(root, split, HH_SUBSETS if name in ("hh", "sample") else ()), root


def _records(name: str, split: str, sft: bool, path: str | None, cache_dir: str | None,
             max_row_bytes: int) -> tuple[str, Iterable[Record], bool, SplitSource | None, Path | None]:
    """(source description, records, filter comparison rows by their 'split' field, local
    source and its root; None, None for the hub)."""
    local = local_source(name, split, path)
    if local is None:
        hub_name, config, hub_split, by_split = hub_source(name, split, sft)
        return (f"hub:{hub_name}{'/' + config if config else ''}",
                iter_hub(hub_name, config, hub_split, cache_dir, max_row_bytes), by_split, None, None)
    src, root = local
    return (str(path if path is not None else root), (r for f in src.files for r in iter_file(f, max_row_bytes)),
            name == "tldr", src, root)


def load_dataset(name: str, split: str, *, sft: bool = False, path: str | None = None,
                 on_error: str = "raise", cache_dir: str | None = None, held_out: float | None = None,
                 max_row_bytes: int = MAX_ROW_BYTES,
                 on_row: Callable[[], None] | None = None) -> tuple[dict[str, PromptGroup], DataReport]:
    """Load one split of a dataset as prompt groups plus the report of what was read.

    ``path=None`` reads the hub (HH: Anthropic/hh-rlhf; TL;DR: the comparisons of
    openai/summarize_from_feedback, or with ``sft=True`` UCL-DARK/openai-tldr-filtered);
    otherwise a local file or directory (:func:`split_source`). Splits never share rows:

    * a directory with files named for splits (``train.json``/``test.json``, the HH
      ``<subset>/{train,test}.jsonl.gz``, a preproc output) gives each split its own files;
    * comparison rows carry their own ``split`` ("train" -> train, "valid1"/"valid2" ->
      test); rows of the other split are counted as ``other_split``;
    * other rows of a source not named for a split (one ``.jsonl`` for both splits) are cut
      by prompt: with ``held_out=f`` the prompts for which :func:`held_out_test` holds are
      the test split and the rest the train split (the trainer passes ``data.held_out``);
      with ``held_out=None`` the caller means the whole source as ``split``.

    The report's ``split_rule`` says which applied. Raises :class:`DataError` (``option``
    ``data.paths.<name>``, or ``datasets`` for the hub) for a broken row (unless
    ``on_error="skip"``), a row larger than ``max_row_bytes`` (bytes; ``iter_file``; counted as
    ``row_too_large`` with ``on_error="skip"``), a missing split file, a folder without data files,
    and a split with no examples. ``on_row()`` is called after each row read (progress).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if held_out is not None and not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be a fraction in (0, 1) or None, not {held_out!r}")
    option = f"data.paths.{name}" if path is not None else f"datasets=[{name}] (hub)"
    try:
        return _load(name, split, sft, path, on_error, cache_dir, held_out, max_row_bytes, on_row)
    except DataError as e:
        e.option = e.option or option
        if not e.hint and e.line is not None:
            e.hint = ("the file is cut short or corrupt: fetch it again" if e.reason == "corrupt_file" else
                      "fix or delete that row, or set data.on_error=skip to skip broken rows and count them")
        raise


def _load(name: str, split: str, sft: bool, path: str | None, on_error: str, cache_dir: str | None,
          held_out: float | None, max_row_bytes: int,
          on_row: Callable[[], None] | None) -> tuple[dict[str, PromptGroup], DataReport]:
    source, records, by_split, src, root = _records(name, split, sft, path, cache_dir, max_row_bytes)
    report = DataReport(name, split, source)
    cut = src is not None and src.rule == "rows" and held_out is not None
    files = src.describe(root) if src is not None and root.is_dir() else ""
    if src is not None and src.rule == "files":
        report.split_rule = f"own files {files}"
    elif cut:
        report.split_rule = (("comparison rows by their own 'split' field; other rows " if name == "tldr" else "")
                             + f"held-out cut by prompt: test = prompts whose sha256 falls in the first {held_out:g} "
                             f"of its range (data.held_out), train = the rest")
    groups = _Groups(TRUNCATION_MODE[name], report, sft, per_row=name == "tldr")
    keep_splits = TLDR_SPLITS[split]

    def in_split(prompt: str) -> bool:
        if cut and held_out_test(prompt, held_out) != (split == "test"):
            report.count("other_split")
            return False
        return True

    def add(row: Any, where: str) -> None:
        if name != "tldr":
            parsed = parse_hh(row, report)
            if in_split(parsed[0]):
                groups.add_pair(*parsed, where)
            return
        own_split = by_split and isinstance(row, dict) and "summaries" in row and "split" in row
        if own_split and _field(row, "split", str) not in keep_splits:
            report.count("other_split")
            return
        out = parse_tldr_any(row, report)
        if out[0] == "drop":  # a CNN/DM row: the reference's TL;DR files keep it, so it keeps its place
            groups.slot()
            return
        if not own_split and not in_split(out[1]):
            return
        if out[0] == "pair":
            groups.add_pair(*out[1:], where)
        elif out[0] == "sft":
            if not sft:
                raise RowError("sft_row", "an SFT row (prompt + target) in a preference load; pass sft=True")
            groups.add_target(*out[1:], where)

    for rec in records:
        apply_row(rec, report, on_error, lambda row, where=rec.where: add(row, where))
        if on_row is not None:
            on_row()
    report.prompts = len(groups.groups)
    report.pairs = sum(len(g.pairs) for g in groups.groups.values())
    report.order_sizes = groups.sizes
    if not groups.groups:
        raise DataError(source, None, f"no {split} examples{' in ' + files if files else ''} "
                        f"({report.rows_read} rows read; rules applied: "
                        f"{report.fmt(report.anomalies)}; rows skipped: {report.fmt(report.skipped)})",
                        hint=f"give the {split} split its own file with {split} rows"
                        + (", or check data.held_out" if cut else ""))
    return groups.groups, report
