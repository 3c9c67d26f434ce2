"""Segment attention for packed rows: prefix sharing without masks, and mask-free padded rows.

A packed micro-batch (``layout.pack``) is cut into **query segments** and **key segments** of
equal count; query segment i attends causally to key segment i, the causal diagonal aligned to
the *bottom right* (the last query sees the whole key segment):

* a plain sequence (``packed``, SFT): query = key = the sequence;
* a prefix-shared pair ``shared | chosen | rejected``: query ``[shared + chosen]`` with key
  ``[shared + chosen]``, and query ``[rejected]`` with key ``[shared + rejected]`` (the shared
  part's keys and values gathered once more per layer by one ``index_select``);
* row padding (rows of a multi-row packing): each padding run its own causal segment, so every
  position has a finite output (the head never reads it).

Rejected's queries then see the shared prefix and themselves, never chosen, with no mask at all.
``Segments`` holds the metadata (``cu_q``, ``cu_k``: int32 cumulative lengths, ``kv_index``: the
key gather, ``max_q`` / ``max_k`` as host ints), built once per micro-batch by
``layout.PackedBatch.segments`` and shared by the policy and the reference.

``segment_attention`` runs it: on CUDA with bf16/fp16 inputs through FlashAttention-2's varlen
kernel in torch (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10; sm80+); elsewhere
(CPU, or fp32 on CUDA) through ``emulate``, one SDPA call per segment with a bottom-right causal
mask, which gives the same numbers (the GPU suite checks the kernel against it).

The module plugs into Hugging Face models without forking them: ``register`` adds the attention
implementation ``NAME`` to ``transformers.AttentionInterface`` and its mask function to
``AttentionMaskInterface``. Extra keyword arguments given to the base model reach the attention
function, so ``LogProbModel`` passes ``caldpo_segments=Segments``. Without them the function is
Hugging Face's SDPA attention, and the mask function is its SDPA mask, so padded rows with
padding, and generation, keep their masks. One exception skips mask construction: a 2D mask made
by ``full_mask`` (all ones, tagged) tells the mask function there is nothing to mask; SDPA then
runs ``is_causal`` with no mask, and so can pick its flash kernel. That is exact for right-padded
training rows: a valid query never attends to a padding key, since padding comes after every
valid token of its row; padding positions get finite garbage that no scored position reads.
It also skips Hugging Face's host syncs (``mask.all()``, packed-sequence detection) per forward.
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("caldpo")

# The Hugging Face attention implementation name this module registers.
NAME = "caldpo"
SEGMENTS_KWARG = "caldpo_segments"
_FULL_TAG = "_caldpo_full_mask"
VARLEN_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Segments:
    """Varlen metadata of a packed micro-batch of ``total_q`` positions (all rows, flattened).

    cu_q: [S+1] int32, cumulative query-segment lengths (0, ..., total_q); query segment i is the
        positions cu_q[i]:cu_q[i+1] of the flattened rows, and the segments tile all of them.
    cu_k: [S+1] int32, cumulative key-segment lengths (0, ..., total_k).
    kv_index: [total_k] int32, the flattened position of each gathered key, or None when the keys
        are the positions themselves (no prefix-shared pair: cu_k == cu_q).
    max_q, max_k: longest query / key segment (host ints, what the kernel takes).
    q_lens, k_lens: the segment lengths on the host (the emulation's loop).
    Tensors live on one device; ``to`` moves them (pinned, non-blocking from the host).
    """

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    kv_index: torch.Tensor | None
    max_q: int
    max_k: int
    q_lens: tuple[int, ...]
    k_lens: tuple[int, ...]

    @property
    def total_q(self) -> int:
        return sum(self.q_lens)

    @property
    def total_k(self) -> int:
        return sum(self.k_lens)

    @classmethod
    def from_spans(cls, q_spans: list[tuple[int, int]], k_spans: list[list[tuple[int, int]]],
                   total: int) -> "Segments":
        """From per-segment spans on the host: ``q_spans[i] = (start, length)`` of query segment i,
        ``k_spans[i]`` the (start, length) pieces its keys are gathered from, in order. Segments with
        no query are dropped. Raises ValueError unless the query spans tile ``[0, total)`` in order
        (a position outside every segment would get no output) and each key segment is at least as
        long as its query segment."""
        q_lens, k_lens, index, pos = [], [], [], 0
        for (start, n), pieces in zip(q_spans, k_spans):
            if n == 0:
                continue
            if start != pos:
                raise ValueError(f"query segments must tile the rows in order: a segment starts at {start}, "
                                 f"expected {pos}")
            k = sum(m for _, m in pieces)
            if k < n:
                raise ValueError(f"key segment of {k} positions for a query segment of {n}")
            q_lens.append(n)
            k_lens.append(k)
            for s, m in pieces:
                index.extend(range(s, s + m))
            pos += n
        if pos != total:
            raise ValueError(f"query segments cover {pos} of {total} positions")
        identity = index == list(range(total))
        cu = torch.tensor([0, *q_lens], dtype=torch.int64).cumsum(0).to(torch.int32)
        cu_k = cu if identity else torch.tensor([0, *k_lens], dtype=torch.int64).cumsum(0).to(torch.int32)
        kv = None if identity else torch.tensor(index, dtype=torch.int32)
        return cls(cu, cu_k, kv, max(q_lens, default=0), max(k_lens, default=0), tuple(q_lens), tuple(k_lens))

    def to(self, device: torch.device) -> "Segments":
        """The same metadata with its tensors on ``device`` (pinned non-blocking copies from the host)."""
        from .host import to_device
        if self.cu_q.device == torch.device(device):
            return self
        move = functools.partial(to_device, device=device)
        return Segments(move(self.cu_q), move(self.cu_k), None if self.kv_index is None else move(self.kv_index),
                        self.max_q, self.max_k, self.q_lens, self.k_lens)


# ----------------------------------------------------------------------------- the kernels

@functools.lru_cache(maxsize=1)
def varlen_signature() -> tuple[str, ...] | None:
    """The parameter names of ``torch.nn.attention.varlen.varlen_attn``, or None when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return tuple(inspect.signature(varlen_attn).parameters)


def varlen_unavailable(device: torch.device) -> str | None:
    """Why the varlen kernel cannot run on ``device`` (None: it can): no CUDA device, a torch without
    ``varlen_attn`` (before 2.10), a GPU older than sm80, or a signature this module does not know."""
    params = varlen_signature()
    if torch.device(device).type != "cuda":
        return "the varlen kernel is CUDA only"
    if params is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (torch >= 2.10)"
    if "window_size" not in params and "is_causal" not in params:
        return f"varlen_attn{params}: neither window_size nor is_causal to ask for causal attention"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"{torch.cuda.get_device_name(device)} (sm{major}x): FlashAttention-2 needs sm80 or newer"
    return None


def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, scale: float | None) -> torch.Tensor:
    """FlashAttention-2's varlen kernel (torch's ``varlen_attn``), causal, bottom-right aligned.

    q: [total_q, Hq, D]; k, v: [total_k, Hkv, D] (already gathered); bf16/fp16 on CUDA -> [total_q, Hq, D].
    Adapts to the signature of the installed torch: causal through ``window_size=(-1, 0)`` (2.11+) or
    ``is_causal=True`` (2.10); GQA through ``enable_gqa`` or repeated key heads; a ``scale`` other than
    D**-0.5 folded into q when the kernel takes none.
    """
    from torch.nn.attention.varlen import varlen_attn
    params = varlen_signature()
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if scale is not None:
        if "scale" in params:
            kw["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
            q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, **kw)


def emulate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, scale: float | None) -> torch.Tensor:
    """The varlen computation with one SDPA call per segment (any device and dtype; CPU's path).

    Same shapes as ``varlen``. A segment with as many keys as queries is plain causal
    (``is_causal``); one with more keys (rejected, whose keys start with the shared prefix) gets a
    bottom-right causal mask: query t sees keys 0 .. t + (keys - queries).
    """
    outs = []
    qo = ko = 0
    gqa = k.shape[1] != q.shape[1]
    for nq, nk in zip(seg.q_lens, seg.k_lens):
        qs = q[qo:qo + nq].transpose(0, 1).unsqueeze(0)
        ks = k[ko:ko + nk].transpose(0, 1).unsqueeze(0)
        vs = v[ko:ko + nk].transpose(0, 1).unsqueeze(0)
        if nq == nk:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril_(nk - nq)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))
        qo += nq
        ko += nk
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seg: Segments,
                      scale: float | None = None, *, kernel: str = "auto") -> torch.Tensor:
    """Causal attention of every query segment to its key segment (module docstring).

    query: [B, Hq, L, D]; key, value: [B, Hkv, L, D] (Hugging Face's layout, B rows of L positions,
    ``B * L == seg.total_q``) -> [B, L, Hq, D] (what an HF attention function returns).
    kernel: "auto" (varlen on CUDA for bf16/fp16, else the emulation), "varlen" or "emulate".
    Raises ValueError when the rows do not hold ``seg.total_q`` positions.
    """
    b, hq, n, d = query.shape
    if b * n != seg.total_q:
        raise ValueError(f"segment metadata for {seg.total_q} positions, rows hold {b} x {n}")
    q = query.transpose(1, 2).reshape(b * n, hq, d)
    k = key.transpose(1, 2).reshape(b * n, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * n, value.shape[1], d)
    if seg.kv_index is not None:
        k, v = k.index_select(0, seg.kv_index), v.index_select(0, seg.kv_index)
    if kernel == "auto":
        kernel = "varlen" if query.is_cuda and query.dtype in VARLEN_DTYPES else "emulate"
    out = varlen(q, k, v, seg, scale) if kernel == "varlen" else emulate(q, k, v, seg, scale)
    return out.reshape(b, n, hq, d)


# ----------------------------------------------------------------------------- Hugging Face wiring

def full_mask(rows: int, length: int, device: torch.device) -> torch.Tensor:
    """[rows, length] bool all-ones 2D attention mask, tagged: "no position needs masking" (right-padded
    training rows, packed rows run as segments). The registered mask function returns None for it
    without reading it (no host sync); any other implementation reads it as the all-ones mask it is."""
    mask = torch.ones(rows, length, dtype=torch.bool, device=device)
    setattr(mask, _FULL_TAG, True)
    return mask


def is_full_mask(mask) -> bool:
    return mask is not None and getattr(mask, _FULL_TAG, False)


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: segments when the forward carries them, else HF's SDPA."""
    seg = kwargs.pop(SEGMENTS_KWARG, None)
    if seg is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout:
        raise ValueError(f"segment attention runs without dropout (got {dropout})")
    window = kwargs.get("sliding_window")
    if window is not None:
        raise ValueError(f"segment attention has no sliding window (layer asks for {window})")
    return segment_attention(query, key, value, seg, scaling), None


def _hf_mask(*args, attention_mask=None, **kwargs):
    """The registered mask function: None for a ``full_mask``, else HF's SDPA mask."""
    if is_full_mask(attention_mask):
        return None
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


@functools.lru_cache(maxsize=1)
def register() -> str:
    """Register ``NAME`` with transformers' attention and mask interfaces (once); returns ``NAME``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, _hf_attention)
    AttentionMaskInterface.register(NAME, _hf_mask)
    return NAME


def unsupported(config) -> str | None:
    """Why a model config cannot take ``NAME`` (None: it can): a sliding window or an attention
    soft-cap (the segment path has neither), or non-causal attention."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window, uses = getattr(text, "sliding_window", None), getattr(text, "use_sliding_window", None)
    sliding_layers = any("sliding" in str(t) for t in (getattr(text, "layer_types", None) or ()))
    if window and (uses if uses is not None else True) or sliding_layers:  # Qwen2: a window set but not used
        return f"sliding-window attention (sliding_window={window})"
    if getattr(text, "attn_logit_softcapping", None):
        return f"an attention soft-cap (attn_logit_softcapping={text.attn_logit_softcapping})"
    if getattr(text, "is_causal", True) is False:
        return "non-causal attention"
    return None


# ----------------------------------------------------------------------------- which attention runs

# The packed layouts on CPU run as segments (the emulation) rather than on dense 4D masks: measured
# no slower (benchmarks/README.md, "Segment attention on CPU"); a one-line decision.
CPU_SEGMENTS = True


def packed_attention(requested: str, attn: str, layout: str, device: torch.device,
                     compute_dtypes: tuple[torch.dtype, ...]) -> str:
    """The attention a run uses once its layout is known: "varlen" (packed rows as segments:
    ``segment_attention``) or ``attn`` (``model.check_attention``'s choice) unchanged.

    requested: ``model.attn_implementation`` as configured (auto, sdpa, varlen, ...).
    compute_dtypes: the dtypes the policy and the reference compute in (mixed precision included).
    * padded layout: no segments ("varlen" runs as "sdpa": padded rows take no segments);
    * packed layouts with ``auto`` or ``varlen`` on an SDPA-capable model: on CPU segments when
      ``CPU_SEGMENTS`` (the emulation); on CUDA segments when every model computes in bf16/fp16 and
      the varlen kernel runs there (``varlen_unavailable``), else today's dense masks ("sdpa") with
      one log line saying why (an fp32 policy without mixed precision, an old torch or GPU);
    * an explicit ``sdpa`` keeps the dense masks.
    """
    if attn == "varlen" and layout == "padded":
        return "sdpa"
    if layout == "padded" or attn not in ("sdpa", "varlen") or requested == "sdpa":
        return attn
    if device.type != "cuda":
        return "varlen" if (attn == "varlen" or CPU_SEGMENTS) else "sdpa"
    why = varlen_unavailable(device)
    wide = [d for d in compute_dtypes if d not in VARLEN_DTYPES]
    if why is None and wide:
        why = (f"a model computes in {wide[0]} (the varlen kernel takes bf16/fp16: set "
               "model.fsdp_policy_mp=bfloat16 or model.policy_dtype=bfloat16)")
    if why is None:
        return "varlen"
    log.info("layout=%s on CUDA: packed rows run on dense 4D masks (SDPA), not the varlen kernel: %s", layout, why)
    return "sdpa"


def hf_implementation(attn: str, config) -> str:
    """The transformers ``attn_implementation`` to load for caldpo's choice ``attn``: ``NAME`` (registered
    here) for "sdpa" and "varlen" when the model can take it (``unsupported``), else ``attn`` as is.
    Raises ValueError for "varlen" on a model that cannot take it."""
    if attn not in ("sdpa", "varlen"):
        return attn
    why = unsupported(config)
    if why is None:
        return register()
    if attn == "varlen":
        raise ValueError(f"segment attention (varlen) cannot run a model with {why}")
    return "sdpa"
