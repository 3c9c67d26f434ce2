"""Batch layouts: padded rows, padding-free packed rows, and prefix-shared pairs.

``padded`` runs every sequence as its own right-padded row (chosen over rejected): the
oracle. The other two layouts pack the sequences of a micro-batch into rows without
padding between them and score them through an explicit head index:

* ``packed``: each sequence (chosen, rejected, or the SFT target) is one segment of a
  row. A segment attends causally to itself only (a document mask); its position ids
  restart at 0.
* ``prefix_shared``: a preference pair is one segment ``shared | chosen | rejected``,
  where ``shared`` is the longest common prefix of the pair's two token sequences (the
  prompt, or more when the responses begin alike). Rejected tokens attend to the shared
  part and to themselves, never to chosen; their position ids continue from the shared
  part's end as if chosen were absent. Under causal attention the shared rows' hidden
  states are then exactly those of either padded row, so every response token sees the
  same context, at the same positions, as in the padded layout. The last shared row
  predicts the first token of both responses: the head index lists it twice, once with
  each target. SFT examples (no rejected) are packed as in ``packed``.

Reference: Wang & Hegde, "Accelerating Direct Preference Optimization with Prefix
Sharing" (2024), section 3 (mask and position ids).

Sequence order of the per-sequence outputs is the padded layout's: chosen ``0..n-1``
then rejected ``n..2n-1`` (SFT: ``0..n-1``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .batches import IGNORE_INDEX

log = logging.getLogger("caldpo")

LAYOUTS = ("padded", "packed", "prefix_shared")
# Attention implementations that take the 4D masks built here (the rest, e.g. flash-attn
# without varlen wiring, only support ``padded``).
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
# ... and those that can run a packed layout at all: the masked ones, and segments (attention.py).
PACKED_ATTENTION = MASKED_ATTENTION + ("varlen",)
# layout=auto on CUDA. Pending a GPU table (benchmarks/gpu_suite.sh, the e2e stage) showing
# prefix_shared (varlen segments) ahead of padded at the Pythia-2.8B shape: then "prefix_shared".
CUDA_AUTO_LAYOUT = "padded"

SHARED, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class PackedBatch:
    """A micro-batch laid out as packed rows plus the head's gather index.

    input_ids, position_ids, segment, branch: [R, L] int64. ``segment`` numbers the
    segments of the micro-batch (-1 on row padding, which attends only to itself);
    ``branch`` is SHARED / CHOSEN / REJECTED (prefix-shared pairs) or SHARED.
    rows, targets, sequence: [N] int64, one entry per scored token: the flat row index
    ``r * L + t`` of the hidden state that predicts ``targets``, and the output sequence
    it belongs to (chosen ``i``, rejected ``n + i``).
    spans: the attention segments on the host, ``(query span, key spans)`` per segment in flat
    positions (``attention.Segments.from_spans``), row padding included as segments of its own.
    as_segments: the forward runs ``attention.segment_attention`` on ``segments()`` (varlen on CUDA,
    its emulation on CPU) instead of a 4D mask.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    branch: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    sequence: torch.Tensor
    n_sequences: int
    spans: tuple = ()
    as_segments: bool = False
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def n_tokens(self) -> int:
        """Tokens that run through the backbone (row padding excluded)."""
        return int((self.segment >= 0).sum())

    @property
    def n_scored(self) -> int:
        """Scored tokens (head rows), known on the host."""
        return int(self.targets.shape[0])

    def to(self, device: torch.device) -> "PackedBatch":
        """The batch on ``device`` (pinned, non-blocking copies; the segment metadata too when it runs
        as segments)."""
        from .host import to_device
        if self.input_ids.device == torch.device(device):
            return self
        moved = {k: to_device(getattr(self, k), device) for k in
                 ("input_ids", "position_ids", "segment", "branch", "rows", "targets", "sequence")}
        out = PackedBatch(**moved, n_sequences=self.n_sequences, spans=self.spans, as_segments=self.as_segments)
        if self.as_segments:
            out._masks["segments"] = self.segments().to(device)
        return out

    def segments(self):
        """The varlen metadata (``attention.Segments``), built once from ``spans`` on the host."""
        if "segments" not in self._masks:
            from .attention import Segments
            q_spans = [q for q, _ in self.spans]
            k_spans = [k for _, k in self.spans]
            self._masks["segments"] = Segments.from_spans(q_spans, k_spans, self.input_ids.numel())
        return self._masks["segments"]

    def allowed(self) -> torch.Tensor:
        """[R, 1, L, L] bool: query t may attend to key s (same segment, s <= t, and a rejected
        query never sees a chosen key); a padding position attends only to itself."""
        seg, br = self.segment, self.branch
        L = seg.shape[1]
        idx = torch.arange(L, device=seg.device)
        # each padding position is a segment of its own, so it sees only itself
        key = torch.where(seg >= 0, seg, -1 - idx)
        ok = key[:, :, None] == key[:, None, :]
        ok &= torch.ones(L, L, dtype=torch.bool, device=seg.device).tril_()
        ok &= ~((br[:, :, None] == REJECTED) & (br[:, None, :] == CHOSEN))
        return ok[:, None]

    def attention_mask(self, attn: str, dtype: torch.dtype = torch.float32):
        """The mask in the form ``attn`` takes, built once per micro-batch and reused by every
        layer and by the policy and reference forwards.

        sdpa (and ``attention.NAME``, which runs SDPA for masks): [R,1,L,L] bool (True = attend);
        eager: [R,1,L,L] additive ``dtype`` (0 / min); flex_attention: a ``BlockMask`` (empty blocks
        skipped).
        """
        from .attention import NAME
        attn = "sdpa" if attn == NAME else attn
        key = (attn, dtype if attn == "eager" else None)
        if key in self._masks:
            return self._masks[key]
        if attn == "sdpa":
            mask = self.allowed()
        elif attn == "eager":
            mask = torch.zeros(self.allowed().shape, dtype=dtype, device=self.segment.device)
            mask.masked_fill_(~self.allowed(), torch.finfo(dtype).min)
        elif attn == "flex_attention":
            mask = self._block_mask()
        else:
            raise ValueError(f"attention {attn!r} cannot take a packed layout; use one of {MASKED_ATTENTION}")
        self._masks[key] = mask
        return mask

    def _block_mask(self):
        from torch.nn.attention.flex_attention import create_block_mask
        seg, br = self.segment, self.branch

        def mask_mod(b, h, q, kv):
            same = (seg[b, q] == seg[b, kv]) & (seg[b, q] >= 0)
            cross = (br[b, q] == REJECTED) & (br[b, kv] == CHOSEN)
            return ((q >= kv) & same & ~cross) | (q == kv)

        R, L = seg.shape
        return create_block_mask(mask_mod, R, None, L, L, device=seg.device)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _as_list(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def _segments(examples: Sequence[dict[str, Any]], layout: str, sft: bool):
    """Per segment: (token ids, position ids, branch tags, [(offset, target, sequence)], attention parts),
    where each part is ``(query start, query length, [(key start, key length), ...])`` relative to the
    segment's first position."""
    n = len(examples)
    out = []
    for i, ex in enumerate(examples):
        c_ids, c_lab = _as_list(ex["chosen_input_ids"]), _as_list(ex["chosen_labels"])
        if sft or "rejected_input_ids" not in ex:
            out.append(_plain(c_ids, c_lab, i))
            continue
        r_ids, r_lab = _as_list(ex["rejected_input_ids"]), _as_list(ex["rejected_labels"])
        if layout == "packed":
            out.append(_plain(c_ids, c_lab, i))
            out.append(_plain(r_ids, r_lab, n + i))
            continue
        s = _common_prefix(c_ids, r_ids)
        nc, nr = len(c_ids) - s, len(r_ids) - s
        ids = c_ids + r_ids[s:]
        pos = list(range(s + nc)) + list(range(s, s + nr))
        branch = [SHARED] * s + [CHOSEN] * nc + [REJECTED] * nr
        head = []
        # A label at logical position t is predicted by the row of position t - 1 of the same sequence.
        for t in range(1, len(c_lab)):
            if c_lab[t] != IGNORE_INDEX:
                head.append((t - 1, c_lab[t], i))
        for t in range(1, len(r_lab)):
            if r_lab[t] != IGNORE_INDEX:
                head.append((t - 1 if t - 1 < s else t - 1 + nc, r_lab[t], n + i))
        # queries [shared + chosen] see keys [shared + chosen]; queries [rejected] see [shared + rejected]
        parts = [(0, s + nc, [(0, s + nc)]), (s + nc, nr, [(0, s), (s + nc, nr)])]
        out.append((ids, pos, branch, head, parts))
    return out


def _plain(ids: list[int], labels: list[int], seq: int):
    head = [(t - 1, labels[t], seq) for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]
    return ids, list(range(len(ids))), [SHARED] * len(ids), head, [(0, len(ids), [(0, len(ids))])]


def pack(examples: Sequence[dict[str, Any]], layout: str, *, sft: bool, pad_token_id: int,
         row_tokens: int | None = None, segments: bool = False) -> PackedBatch:
    """Lay out tokenized examples (``tokenize_example``'s keys ``{chosen,rejected}_{input_ids,labels}``,
    as lists or 1-D tensors) as packed rows.

    ``row_tokens``: capacity of one row; segments are placed first-fit in decreasing length
    (a segment longer than the capacity gets a row of its own). None: the longest segment's
    length, which bounds a dense mask's attention cost by the padded layout's; 0: one row
    holds the whole micro-batch (for block-sparse attention, which skips empty blocks).
    Rows are right-padded to the longest row.
    ``segments``: the batch runs as attention segments (``PackedBatch.as_segments``, varlen on CUDA);
    ``row_tokens`` then defaults to 0, one row without padding.
    Raises ValueError for an unknown layout or ``padded`` (which has no packed form).
    """
    if layout not in ("packed", "prefix_shared"):
        raise ValueError(f"layout {layout!r} has no packed form; use 'packed' or 'prefix_shared'")
    segs = _segments(examples, layout, sft)
    order = sorted(range(len(segs)), key=lambda k: -len(segs[k][0]))
    if row_tokens is None and segments:
        row_tokens = 0
    if row_tokens is None:
        row_tokens = max((len(s[0]) for s in segs), default=1)
    rows: list[list[int]] = []
    fill: list[int] = []
    for k in order:
        n = len(segs[k][0])
        for r in range(len(rows)):
            if row_tokens == 0 or fill[r] + n <= row_tokens:
                rows[r].append(k)
                fill[r] += n
                break
        else:
            rows.append([k])
            fill.append(n)
    if not rows:
        rows, fill = [[]], [0]
    R, L = len(rows), max(max(fill), 1)
    input_ids = torch.full((R, L), int(pad_token_id), dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    segment = torch.full((R, L), -1, dtype=torch.long)
    branch = torch.zeros((R, L), dtype=torch.long)
    h_rows, h_tgt, h_seq = [], [], []
    spans = []
    for r, members in enumerate(rows):
        off = 0
        for k in sorted(members):  # segments keep the micro-batch's order within a row
            ids, pos, br, head, parts = segs[k]
            n = len(ids)
            base = r * L + off
            spans.extend(((base + q0, nq), [(base + k0, nk) for k0, nk in keys]) for q0, nq, keys in parts)
            input_ids[r, off:off + n] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, off:off + n] = torch.tensor(pos, dtype=torch.long)
            segment[r, off:off + n] = k
            branch[r, off:off + n] = torch.tensor(br, dtype=torch.long)
            for o, tgt, seq in head:
                h_rows.append(r * L + off + o)
                h_tgt.append(tgt)
                h_seq.append(seq)
            off += n
        # padding continues the position ids so that rotary tables stay in range
        position_ids[r, off:] = torch.arange(L - off)
        if off < L:  # row padding: a causal segment of its own (finite outputs nobody reads)
            spans.append(((r * L + off, L - off), [(r * L + off, L - off)]))
    n_seq = len(examples) * (1 if sft or not examples or "rejected_input_ids" not in examples[0] else 2)
    return PackedBatch(input_ids, position_ids, segment, branch,
                       torch.tensor(h_rows, dtype=torch.long), torch.tensor(h_tgt, dtype=torch.long),
                       torch.tensor(h_seq, dtype=torch.long), n_seq, spans=tuple(spans), as_segments=segments)


def segment_sum(values: torch.Tensor, sequence: torch.Tensor, n_sequences: int,
                average: bool = False) -> torch.Tensor:
    """Per-sequence sum (or mean) of per-token ``values`` [N] grouped by ``sequence`` [N] -> [S] float32;
    0.0 for a sequence with no scored token."""
    out = torch.zeros(n_sequences, dtype=torch.float32, device=values.device)
    out = out.index_add(0, sequence, values.float())
    if average:
        count = torch.zeros(n_sequences, dtype=torch.float32, device=values.device)
        count = count.index_add(0, sequence, torch.ones_like(values, dtype=torch.float32))
        out = out / count.clamp(min=1)
    return out


def resolve_layout(layout: str, attn: str, device_type: str = "cpu") -> str:
    """The layout to run with attention implementation ``attn`` on ``device_type``.

    ``auto``: on CPU, ``prefix_shared`` where ``attn`` can run packed rows (``PACKED_ATTENTION``:
    sdpa, eager, flex_attention, varlen), else ``padded`` with one log line. On CUDA ``auto`` is
    ``CUDA_AUTO_LAYOUT`` (padded): on an H200 (Pythia-410M shape, the HH-format sample, Cal-DPO, bf16)
    the dense-mask SDPA path ran prefix_shared at 0.81x and packed at 0.63x the padded tokens/s, and
    flex_attention at 0.68x (benchmarks/results/h200_20261129/); the varlen path (attention.py) awaits
    its GPU table. Ask for a layout explicitly to use it. An explicit ``packed`` or ``prefix_shared``
    that ``attn`` cannot run is a ConfigError.
    """
    from .config import ConfigError
    if layout not in ("auto",) + LAYOUTS:
        raise ConfigError(f"layout={layout!r}: choose auto or one of {list(LAYOUTS)}")
    if layout == "auto" and device_type == "cuda" and (CUDA_AUTO_LAYOUT == "padded" or attn not in PACKED_ATTENTION):
        log.info("layout=auto on CUDA: the padded layout (until a GPU table shows prefix sharing ahead); "
                 "layout=prefix_shared asks for prompt sharing")
        return "padded"
    if layout == "padded" or attn in PACKED_ATTENTION:
        return "prefix_shared" if layout == "auto" else layout
    if layout != "auto":
        raise ConfigError(f"layout={layout} needs an attention implementation that can run packed rows "
                          f"({', '.join(PACKED_ATTENTION)}), not {attn}: use layout=padded, or "
                          "model.attn_implementation=sdpa")
    log.info("layout=auto: attention %s cannot run packed rows; running the padded layout", attn)
    return "padded"
