"""Reference log-probs: from a live frozen reference model, or computed once and cached on disk.

``reference.mode=model`` runs the reference on every micro-batch, on the policy's inputs
(padded rows or the micro-batch's ``PackedBatch``). ``reference.mode=cache`` computes the
log-probs of every train and eval example once (``build_cache``), stores them with a
content key and a checksum, and serves them by example index; the reference model is then
freed. Either way ``ReferenceLogps(batch, inputs)`` returns (chosen, rejected) float32 [B].
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .distributed import Process
from .host import to_device
from .losses import concatenated
from .model import DTYPES, LogProbModel, apply_archive, load_causal_lm

log = logging.getLogger("caldpo")


def load_reference(cfg: DictConfig, path: str, attn: str, archive: dict | None, process: Process,
                   backend: str, options) -> LogProbModel:
    """The frozen reference (``model.reference_dtype``; float16 runs as float32 on CPU), with the SFT
    archive applied when there is one, placed on the process's device or sharded (no mixed precision)."""
    dtype = DTYPES[cfg.model.reference_dtype]
    if process.device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
        if process.is_main:
            log.info("reference_dtype float16 is slow on CPU: the reference runs in float32")
    lm = load_causal_lm(cfg, path, dtype, attn)
    if archive is not None:
        apply_archive(lm, archive, cfg.model.archive)
    lm.requires_grad_(False).eval()
    model = LogProbModel(lm, backend, options=options)
    process.place(model, cfg, trainable=False)
    return model


class ReferenceLogps:
    """(chosen, rejected) reference log-probs of a micro-batch, float32 [B] each, on ``device``.

    model: the live reference (``LogProbModel``), run on the policy's ``inputs``; or cache:
    split name -> float32 [examples, 2] (chosen, rejected), read at ``batch["example_index"]``.
    """

    def __init__(self, device: torch.device, model: LogProbModel | None = None,
                 cache: dict[str, torch.Tensor] | None = None):
        if (model is None) == (cache is None):
            raise ValueError("ReferenceLogps takes a model or a cache")
        self.device, self.model, self.cache = device, model, cache

    @torch.no_grad()
    def __call__(self, batch: dict, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            idx = torch.as_tensor(batch["example_index"])
            vals = to_device(self.cache[batch["split"]][idx], self.device)  # pinned, non-blocking
            return vals[:, 0], vals[:, 1]
        logps = self.model(**inputs).float()
        n = logps.shape[0] // 2
        return logps[:n], logps[n:]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of ``tensors`` (the reference cache's checksum)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_cache(file: Path, key: str, sizes: dict[str, int]) -> tuple[dict | None, str | None]:
    """(the cached log-probs, None) if ``file`` passes every check, else (None, the reason).

    Checks: loads with ``weights_only=True``, carries ``key``, float32 [n, 2] per split of
    ``sizes``, finite values, and the sha256 stored with it.
    """
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any load failure means: recompute
        return None, f"unreadable: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
    if not isinstance(blob, dict) or "sha256" not in blob or blob.get("key") != key:
        return None, "not a checksummed cache of these examples (written by an older caldpo?)"
    out = {}
    for split, n in sizes.items():
        t = blob.get(split)
        if not torch.is_tensor(t) or t.dtype != torch.float32 or tuple(t.shape) != (n, 2):
            got = (t.dtype, tuple(t.shape)) if torch.is_tensor(t) else type(t).__name__
            return None, f"{split}: expected float32 [{n}, 2], found {got}"
        if not torch.isfinite(t).all():
            return None, f"{split}: {int((~torch.isfinite(t)).sum())} non-finite values"
        out[split] = t
    if tensors_digest(out) != blob["sha256"]:
        return None, "sha256 differs from the one stored with it (bytes changed on disk)"
    return out, None


def cache_key(cfg: DictConfig, path: str, splits, tokenizer) -> str:
    """16 hex digits hashing, by content, what the cached log-probs are computed from: each split's
    examples (``schedule.Examples.fingerprint``: texts and token ids, so a data file edited in place
    gets a new key), the tokenizer's full serialization, the truncation settings, the model (hub
    name, or a local directory's file names, sizes and mtimes), the archive's sha256 and the
    reference dtype."""
    h = hashlib.sha256()
    for data in splits:
        h.update(f"{len(data)}:{data.fingerprint};".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    local = Path(path)
    model = ([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(local.iterdir()) if p.is_file()]
             if local.is_dir() else path)
    arch = cfg.model.archive
    key_src = json.dumps({
        "model": model, "archive": ckpt.archive_digest(Path(arch)) if arch else None,
        "dtype": cfg.model.reference_dtype, "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length, "tokenizer": hashlib.sha256(tok.encode()).hexdigest(),
        "examples": h.hexdigest(),
    }, sort_keys=True, default=str)
    return hashlib.sha256(key_src.encode()).hexdigest()[:16]


def build_cache(cfg: DictConfig, process: Process, splits: dict, collate, load_model, key: str,
                run_dir: Path) -> dict[str, torch.Tensor]:
    """Reference log-probs of every example of ``splits`` (name -> ``schedule.Examples``), from the file
    ``<reference.cache_dir or run_dir/ref_cache>/ref_logps_<key>.pt`` when it passes ``read_cache`` on
    every rank, else computed with ``load_model()`` (each rank its share of each chunk of
    ``eval_batch_size`` examples, summed over ranks), written atomically by rank 0, with a warning
    naming why a file present was not used. ``collate(items, indices, split)`` is the run's
    ``schedule.Collator``. Returns split -> float32 [examples, 2] (chosen, rejected), on the CPU.
    """
    cache_dir = Path(cfg.reference.cache_dir or run_dir / "ref_cache")
    file = cache_dir / f"ref_logps_{key}.pt"
    sizes = {split: len(data) for split, data in splits.items()}
    cached, problem = read_cache(file, key, sizes) if file.exists() else (None, None)
    if not process.any(cached is None):
        if process.is_main:
            log.info("reference log-probs from cache %s", file)
        return cached
    if problem and process.is_main:
        log.warning("reference cache %s is unusable (%s): recomputing it", file, problem)
    ref = load_model()
    out = {}
    bs = cfg.eval_batch_size
    for split, data in splits.items():
        vals = torch.zeros(len(data), 2, dtype=torch.float32)
        chunks = range(0, len(data), bs)
        for start in tqdm(chunks, desc=f"reference log-probs ({split})", disable=not process.is_main):
            mine, weight = process.share(list(range(start, min(start + bs, len(data)))), bs)
            batch = collate([data.items[i] for i in mine], mine, split)
            with torch.no_grad():
                inputs = ({"packed": batch["packed"].to(process.device)} if "packed" in batch
                          else concatenated(batch, process.device))
                logps = ref(**inputs).float().cpu()
            n = len(mine)
            vals[mine, 0] += weight * logps[:n]
            vals[mine, 1] += weight * logps[n:]
        out[split] = process.all_reduce(vals.to(process.device)).cpu()
    del ref
    if process.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        torch.save({**out, "key": key, "sha256": tensors_digest(out)}, tmp)
        os.replace(tmp, file)
        log.info("reference log-probs cached in %s", file)
    process.barrier()
    return out
