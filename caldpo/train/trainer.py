"""The training loop: one process (BasicTrainer) or FSDP2 under torchrun (FSDPTrainer).

One step = ``batch_size`` examples in global order; each rank takes its contiguous
slice and splits it into ``gradient_accumulation_steps`` micro-batches. Data order
is a deterministic permutation per epoch, so the data position is a single count of
examples consumed: resume is exact.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from omegaconf import DictConfig
from tqdm.auto import tqdm

from caldpo.kernels import resolve_backend
from caldpo.kernels.options import from_config as kernel_options_from_config

from . import checkpoint as ckpt
from . import rundir
from .batches import Example, collate, epoch_order, flatten, tokenize_dataset, tokenized
from .config import (TRAINERS, ConfigError, check_run_dir, load_config, run_dir as cfg_run_dir, validate,
                     write_run_config)
from .data import load_dataset
from .faults import fault_point
from .layout import pack, resolve_layout
from .losses import batch_loss, concatenated
from .metrics import MetricsWriter, Throughput, peak_memory_gb, read_jsonl
from .model import (DTYPES, LogProbModel, apply_activation_checkpointing, apply_archive, check_attention,
                    check_vocab_and_positions, count_matmul_params, load_archive_state, load_causal_lm, load_tokenizer,
                    model_path, shard)

log = logging.getLogger("caldpo")


# ----------------------------------------------------------------------------- distributed

def init_distributed(device_pref: str) -> tuple[int, int, int, torch.device]:
    """(rank, world, local_rank, device); initialises torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30),
                                device_id=device if use_cuda else None)
    return rank, world, local, device


def init_single_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group even for one process: a local one on a free port."""
    if dist.is_initialized():
        return
    import socket
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------- data

class Examples:
    """The examples of all datasets, one split (``batches.Example``, in dataset order).

    With a ``tokenizer`` every example is tokenized here, once, at load
    (``batches.tokenize_dataset``): its ids are cached on the example, pairs identical
    after truncation are dropped and counted, and text the tokenizer cannot encode or that
    holds the EOS token stops the run naming its file and line (or, with
    ``data.on_error=skip``, is skipped and counted). Each dataset prints its data report
    and its token report. Without a tokenizer (generation) only the texts are loaded.
    """

    def __init__(self, cfg: DictConfig, split: str, sft: bool, verbose: bool, tokenizer=None):
        self.items: list[Example] = []
        self.reports = []
        self.token_reports = []
        for name in cfg.datasets:
            groups, report = load_dataset(name, split, sft=sft, path=(cfg.data.paths or {}).get(name),
                                          on_error=cfg.data.on_error, cache_dir=cfg.data.cache_dir,
                                          held_out=cfg.data.held_out)
            if verbose:
                print(str(report), flush=True)
            self.reports.append(report)
            items = flatten(groups, sft=sft)
            if tokenizer is not None:
                items, tok_report = tokenize_dataset(
                    items, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                    on_error=cfg.data.on_error, dataset=name, split=split)
                if verbose:
                    print(str(tok_report), flush=True)
                self.token_reports.append(tok_report)
            self.items.extend(items)
        if not self.items:
            raise ConfigError(f"datasets={list(cfg.datasets)}: no {split} examples")

    def __len__(self) -> int:
        return len(self.items)


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of ``tensors`` (the reference cache's checksum)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_reference_cache(file: Path, key: str, sizes: dict[str, int]) -> tuple[dict | None, str | None]:
    """(the cached log-probs, None) if ``file`` passes every check, else (None, the reason)."""
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
    if _tensors_digest(out) != blob["sha256"]:
        return None, "sha256 differs from the one stored with it (bytes changed on disk)"
    return out, None


# ----------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, cfg: DictConfig, argv: list[str] | None = None):
        self.cfg = cfg
        validate(cfg, argv=argv)  # the one preflight, before any process group, data or model
        self.rank, self.world, self.local_rank, self.device = init_distributed(cfg.device)
        self.fsdp = TRAINERS[cfg.trainer] == "fsdp"
        if self.fsdp:
            init_single_process_group(self.device)
        self.is_main = self.rank == 0
        self.run_dir = cfg_run_dir(cfg).resolve()
        other_changes = check_run_dir(cfg, self.run_dir)  # a stored run with other training options: stop
        self.sft = cfg.loss.name == "sft"
        self.stop_requested = False
        self.signals = rundir.StopSignals(announce=self.is_main)
        rundir.exit_with_launcher()
        torch.manual_seed(cfg.seed)
        logging.basicConfig(level=logging.INFO if self.is_main else logging.WARNING,
                            format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        if self.is_main and cfg.loss.name == "dpo":
            print("caldpo: loss=dpo is plain DPO; Cal-DPO is loss=caldpo (or the authors' loss=cal_dpo with "
                  "loss.shift)", flush=True)
        if self.is_main and other_changes:
            log.info("%s holds this run; options that do not change training differ from its config.yaml "
                     "(which keeps the values the run started with): %s", self.run_dir,
                     ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in other_changes.items()))
        self.finished = cfg.resume == "auto" and (self.run_dir / "DONE").exists()
        if self.finished:
            return
        self.lock = self._lock_run_dir()
        if self.is_main:
            write_run_config(cfg, self.run_dir)  # once, when the run starts fresh
        self._barrier()

        try:
            self.backend = resolve_backend(cfg.kernels.backend, self.device)
        except RuntimeError as e:
            raise ConfigError(f"kernels.backend={cfg.kernels.backend}: {e}") from None
        try:  # every kernel setting, passed to the head on each call (caldpo.kernels.KernelOptions)
            self.kernel_options = kernel_options_from_config(cfg.kernels).replace(backend=self.backend)
        except ValueError as e:
            raise ConfigError(f"kernels: {e}") from None
        path = model_path(cfg)
        self.tokenizer = load_tokenizer(cfg, path)
        check_vocab_and_positions(cfg, self.tokenizer, path)
        self.train_data = Examples(cfg, "train", self.sft, self.is_main, self.tokenizer)
        planned = cfg.n_examples if cfg.n_examples is not None else cfg.n_epochs * len(self.train_data)
        if planned < cfg.batch_size:
            raise ConfigError(f"batch_size={cfg.batch_size}: the run would train on {planned} examples "
                              f"({len(self.train_data)} training examples after loading, n_epochs={cfg.n_epochs}, "
                              f"n_examples={cfg.n_examples}), not one full batch; lower batch_size or add data")
        fault_point("data_load")
        self.eval_data = Examples(cfg, "test", self.sft, self.is_main, self.tokenizer)
        self.eval_indices = epoch_order(len(self.eval_data), 0, cfg.seed, True)[: cfg.n_eval_examples]

        attn = check_attention(cfg, self.device)
        self.layout = resolve_layout(cfg.layout, attn, self.device.type)
        # Dense 4D masks cost O(row length^2): rows hold at most the longest segment. A block mask
        # skips empty blocks, so flex attention takes the whole micro-batch as one row.
        self.row_tokens = 0 if attn == "flex_attention" else None
        archive = load_archive_state(cfg.model.archive) if cfg.model.archive else None
        lm = load_causal_lm(cfg, path, DTYPES[cfg.model.policy_dtype], attn)
        if archive is not None:
            apply_archive(lm, archive, cfg.model.archive)
        self.n_params, self.n_layers, self.hidden, self.vocab = count_matmul_params(lm)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(lm, cfg.model.block_name)
        if cfg.compile:
            lm.base_model.compile()
        self.policy = LogProbModel(lm, self.backend, options=self.kernel_options)
        self.reference = None
        self.ref_cache = None
        needs_ref = not self.sft and not cfg.loss.get("reference_free", False)
        if needs_ref and cfg.reference.mode == "model":
            self.reference = self._load_reference(cfg, path, attn, archive)
        self.mesh = None
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            self.mesh = init_device_mesh(self.device.type, (self.world,))
        self._place(self.policy, trainable=True)
        if self.reference is not None:
            self._place(self.reference, trainable=False)
        if needs_ref and cfg.reference.mode == "cache":
            self.ref_cache = self._reference_cache(cfg, path, attn, archive)
        del archive
        if self.is_main:
            log.info("model %s (%s), %.1fM matmul params, attention=%s, layout=%s, kernels=%s, trainer=%s, world=%d, "
                     "device=%s", cfg.model.preset, path, self.n_params / 1e6, attn, self.layout, self.backend,
                     "FSDP2" if self.fsdp else "single", self.world, self.device)

        self.optimizer = self._optimizer()
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.step = 0
        self.examples_seen = 0
        self.next_eval = 0 if cfg.do_first_eval else cfg.eval_every
        self.resumed_from = None
        self.ckpt_root = self.run_dir / "checkpoints"
        self.keep_records = None  # metrics.jsonl lines to keep on resume (None: all)
        self.nonfinite_total = self.nonfinite_run = 0  # skipped non-finite steps: all, and in a row
        if cfg.resume == "auto":
            self._maybe_resume()
        elif (self.run_dir / "metrics.jsonl").exists() or ckpt.latest_resume(self.ckpt_root) is not None:
            raise ConfigError(f"resume=never but run_dir={self.run_dir} already holds a run; "
                              "choose a new run_dir, or resume=auto to continue it")
        if cfg.n_examples is not None:
            self.total_examples = cfg.n_examples
        else:
            self.total_examples = cfg.n_epochs * len(self.train_data)
        self.total_steps = self.total_examples // cfg.batch_size  # a partial final batch is dropped
        self.writer = MetricsWriter(self.run_dir, cfg, enabled=self.is_main, keep_records=self.keep_records)
        self.throughput = Throughput(self.n_params, self.n_layers, self.hidden, self.device,
                                     with_reference=self.reference is not None, world=self.world)

    # -- setup helpers
    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _place(self, model: LogProbModel, trainable: bool) -> None:
        """Shard with FSDP2 on the trainer's mesh, or move to the device in a single process."""
        if self.fsdp:
            shard(model, self.cfg, self.mesh, trainable=trainable)
        else:
            model.to(self.device)

    def _share(self, chunk: list[int]) -> tuple[list[int], float]:
        """This rank's contiguous share of an evaluation-sized chunk, and its weight.

        A rank left with nothing (the last chunk) runs a dummy forward on the chunk's first
        example with weight 0: under FSDP2 every rank must run the same number of forwards.
        """
        per_rank = self.cfg.eval_batch_size // self.world
        mine = chunk[self.rank * per_rank:(self.rank + 1) * per_rank]
        return (mine, 1.0) if mine else (chunk[:1], 0.0)

    @staticmethod
    def _accumulate(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor], weight: float = 1.0) -> None:
        """Add each metric's (sum, count) to ``sums``; ``_reduce`` turns them into means over all ranks."""
        for k, v in metrics.items():
            s = torch.stack([v.sum(), torch.tensor(float(v.numel()), device=v.device)]) * weight
            sums[k] = sums.get(k, 0) + s

    def _load_reference(self, cfg, path, attn, archive) -> LogProbModel:
        dtype = DTYPES[cfg.model.reference_dtype]
        if self.device.type == "cpu" and dtype == torch.float16:
            dtype = torch.float32
            if self.is_main:
                log.info("reference_dtype float16 is slow on CPU: the reference runs in float32")
        lm = load_causal_lm(cfg, path, dtype, attn)
        if archive is not None:
            apply_archive(lm, archive, cfg.model.archive)
        lm.requires_grad_(False).eval()
        return LogProbModel(lm, self.backend, options=self.kernel_options)

    def _optimizer(self) -> torch.optim.Optimizer:
        cls = getattr(torch.optim, self.cfg.optimizer)
        kw = {"lr": self.cfg.lr}
        if self.cfg.weight_decay:
            kw["weight_decay"] = self.cfg.weight_decay
        return cls([p for p in self.policy.parameters() if p.requires_grad], **kw)

    def _lock_run_dir(self) -> rundir.RunLock | None:
        """Rank 0 locks the run directory before anything in it is written; every rank learns the outcome."""
        lock, error = None, None
        if self.is_main:
            try:
                lock = rundir.RunLock(self.run_dir)
            except rundir.RunError as e:
                error = str(e)
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise rundir.RunError(error)
        return lock

    def _maybe_resume(self) -> None:
        """Resume from the newest checkpoint whose manifest verifies (checkpoint.find_resume).

        Newer damaged checkpoints are named and moved aside (``damaged_step_N``). A run directory
        whose checkpoints are all damaged is refused (RunError); one that holds metrics but never
        completed a checkpoint starts from step 0, says so, and drops those records.
        """
        path, skipped = ckpt.find_resume(self.ckpt_root)
        for bad, why in skipped:
            if self.is_main:
                log.warning("checkpoint %s is damaged (%s); %s", bad, why,
                            f"resuming from {path.name}" if path else "no older checkpoint verifies")
        if path is None:
            if skipped:
                raise rundir.RunError(
                    f"cannot resume {self.run_dir}: no usable checkpoint ("
                    + "; ".join(f"{p.name}: {why}" for p, why in skipped)
                    + "). Nothing was changed. To recover: restore checkpoints/ from a copy, or start over "
                    "with a new run_dir (or move checkpoints/ and metrics.jsonl out of this one).")
            metrics = self.run_dir / "metrics.jsonl"
            if metrics.exists() and metrics.stat().st_size > 0:
                if self.is_main:
                    log.warning("%s holds metrics, but no checkpoint was completed before the run stopped: "
                                "training starts again from step 0 and those records are dropped", metrics)
                self.keep_records = 0
            return
        if self.is_main:
            for bad, _ in skipped:
                aside = bad.with_name("damaged_" + bad.name)
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(bad, aside)
        try:
            state = ckpt.load_resume(path, self.policy, self.optimizer, self.scheduler)
        except ckpt.CheckpointError as e:
            raise rundir.RunError(f"cannot resume from {path}: {e}. Its checksums match its manifest, so the "
                                  "files were written this way: remove that checkpoint to resume from an older "
                                  "one, or use a new run_dir.") from None
        except (RuntimeError, KeyError, ValueError, CheckpointException) as e:
            raise ConfigError(f"cannot resume from {path}: it does not match this configuration (a different "
                              f"model or optimizer?): {str(e).strip().splitlines()[-1]} "
                              "Use the original command, or a new run_dir.") from None
        self.step = int(state["step"])
        self.examples_seen = int(state["examples_seen"])
        self.next_eval = int(state["next_eval"])
        self.keep_records = state.get("metrics_records")
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_run = int(state.get("nonfinite_run", 0))
        self.resumed_from = self.step
        if self.is_main:
            log.info("resumed from %s (step %d, %d examples seen)", path, self.step, self.examples_seen)

    # -- batches
    def _tokenize(self, item: Example) -> dict:
        return tokenized(item, self.tokenizer, max_length=self.cfg.max_length,
                         max_prompt_length=self.cfg.max_prompt_length)

    def _collate(self, items) -> dict:
        examples = [self._tokenize(it) for it in items]
        batch = collate(examples, self.tokenizer.pad_token_id)
        batch["pad_token_id"] = self.tokenizer.pad_token_id
        if self.layout != "padded":  # the policy and the reference both run this packed form
            batch["packed"] = pack(examples, self.layout, sft=self.sft, pad_token_id=self.tokenizer.pad_token_id,
                                   row_tokens=self.row_tokens)
        return batch

    def _global_indices(self, start: int, count: int) -> list[int]:
        """Example indices at global positions [start, start+count), epochs following each other."""
        n = len(self.train_data)
        out, pos = [], start
        while len(out) < count:
            epoch, offset = divmod(pos, n)
            order = self._order(epoch)
            take = min(count - len(out), n - offset)
            out.extend(order[offset:offset + take])
            pos += take
        return out

    def _order(self, epoch: int) -> list[int]:
        if getattr(self, "_order_epoch", None) != epoch:
            self._order_cache = epoch_order(len(self.train_data), epoch, self.cfg.seed, True)
            self._order_epoch = epoch
        return self._order_cache

    # -- reference log-probs
    @torch.no_grad()
    def _reference_logps(self, batch, inputs):
        if self.ref_cache is not None:
            idx = torch.as_tensor(batch["example_index"])
            vals = self.ref_cache[batch["split"]][idx].to(self.device)
            return vals[:, 0], vals[:, 1]
        logps = self.reference(**inputs)
        n = batch["chosen_input_ids"].shape[0]
        return logps[:n].float(), logps[n:].float()

    def _reference_cache(self, cfg, path, attn, archive) -> dict[str, torch.Tensor]:
        """Reference log-probs of every train and eval example, computed once and stored on disk.

        The key hashes what they are computed from, by content: the example texts of both splits
        (so a data file edited in place gets a new key), the tokenizer's full serialization, the
        truncation settings, the model (hub name, or a local directory's file names, sizes and
        mtimes), the archive's sha256 and the reference dtype. A cache file is used only when it
        loads with ``weights_only=True``, carries this key, has the shape [examples, 2] float32 per
        split, holds finite values and matches its stored sha256; otherwise it is recomputed, with
        a warning naming the reason.
        """
        key = self._reference_cache_key(cfg, path)
        cache_dir = Path(cfg.reference.cache_dir or self.run_dir / "ref_cache")
        file = cache_dir / f"ref_logps_{key}.pt"
        sizes = {"train": len(self.train_data), "test": len(self.eval_data)}
        cached, problem = _read_reference_cache(file, key, sizes) if file.exists() else (None, None)
        bad = torch.tensor([0.0 if cached is not None else 1.0], device=self.device)
        if float(all_reduce(bad, dist.ReduceOp.MAX if dist.is_initialized() else None).item()) == 0.0:
            if self.is_main:
                log.info("reference log-probs from cache %s", file)
            return cached
        if problem and self.is_main:
            log.warning("reference cache %s is unusable (%s): recomputing it", file, problem)
        ref = self._load_reference(cfg, path, attn, archive)
        self._place(ref, trainable=False)
        out = {}
        for split, data in (("train", self.train_data), ("test", self.eval_data)):
            vals = torch.zeros(len(data), 2, dtype=torch.float32)
            bs = cfg.eval_batch_size
            chunks = range(0, len(data), bs)
            for start in tqdm(chunks, desc=f"reference log-probs ({split})", disable=not self.is_main):
                mine, weight = self._share(list(range(start, min(start + bs, len(data)))))
                batch = self._collate([data.items[i] for i in mine])
                with torch.no_grad():
                    inputs = ({"packed": batch["packed"].to(self.device)} if "packed" in batch
                              else concatenated(batch, self.device))
                    logps = ref(**inputs).float().cpu()
                n = len(mine)
                vals[mine, 0] += weight * logps[:n]
                vals[mine, 1] += weight * logps[n:]
            out[split] = all_reduce(vals.to(self.device)).cpu()
        del ref
        if self.is_main:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
            torch.save({**out, "key": key, "sha256": _tensors_digest(out)}, tmp)
            os.replace(tmp, file)
            log.info("reference log-probs cached in %s", file)
        self._barrier()
        return out

    def _reference_cache_key(self, cfg, path: str) -> str:
        h = hashlib.sha256()
        for data in (self.train_data, self.eval_data):
            h.update(str(len(data)).encode())
            for item in data.items:
                h.update(json.dumps(list(item[:4])).encode() + b"\n")
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        tok = backend.to_str() if backend is not None else json.dumps(sorted(self.tokenizer.get_vocab().items()))
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

    # -- stop requests (Slurm preemption, SIGTERM)
    def _install_signal_handlers(self) -> None:
        """SIGTERM, SIGUSR1 and a first Ctrl-C: checkpoint at the next step boundary and exit; a second
        Ctrl-C exits at once (rundir.StopSignals)."""
        self.signals.install()

    def _should_stop(self) -> bool:
        local = self.stop_requested or self.signals.requested or (self.is_main and (self.run_dir / "STOP").exists())
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        return bool(all_reduce(flag, dist.ReduceOp.MAX if dist.is_initialized() else None).item() > 0)

    # -- steps
    def _micro_batches(self, indices: list[int]):
        per_rank = len(indices) // self.world
        mine = indices[self.rank * per_rank:(self.rank + 1) * per_rank]
        ga = self.cfg.gradient_accumulation_steps
        size = per_rank // ga
        for i in range(ga):
            chunk = mine[i * size:(i + 1) * size]
            batch = self._collate([self.train_data.items[j] for j in chunk])
            batch["example_index"], batch["split"] = chunk, "train"
            yield batch

    def train_step(self, indices: list[int]) -> dict:
        self.policy.train()
        ga = self.cfg.gradient_accumulation_steps
        sums: dict[str, torch.Tensor] = {}
        tokens = sequences = backbone = 0
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # on the device: no sync per micro-batch
        for batch in self._micro_batches(indices):
            loss, metrics = batch_loss(self.cfg, self.policy, self._reference_logps, batch, self.device)
            nonfinite |= ~torch.isfinite(loss.detach())
            (loss / ga).backward()
            # tokens/s counts every layout alike: non-padding tokens of chosen and rejected, the prompt
            # in each; backbone_tokens counts what the backbone ran (no padding, a shared prompt once).
            tokens += int(batch["chosen_attention_mask"].sum())
            sequences += batch["chosen_attention_mask"].shape[0]
            if not self.sft:
                tokens += int(batch["rejected_attention_mask"].sum())
                sequences += batch["rejected_attention_mask"].shape[0]
            if "packed" in batch:
                backbone += batch["packed"].n_tokens
            else:  # padded: chosen over rejected, both padded to the wider of the two
                masks = [batch[f"{k}_attention_mask"] for k in (("chosen",) if self.sft else ("chosen", "rejected"))]
                backbone += sum(m.shape[0] for m in masks) * max(m.shape[1] for m in masks)
            self._accumulate(sums, metrics)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        fault_point("mid_step", self.step + 1)
        nonfinite |= ~torch.isfinite(grad_norm)
        flag = nonfinite.float().reshape(1)
        skip = bool(all_reduce(flag, dist.ReduceOp.MAX if dist.is_initialized() else None).item())
        if not skip:  # a non-finite loss or gradient: no optimizer or scheduler step (train() counts it)
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = self._reduce(sums)
        out["nonfinite"] = skip
        out["grad_norm"] = float(grad_norm)
        out["lr"] = self.scheduler.get_last_lr()[0]
        tok, seqs, bb = all_reduce(torch.tensor([float(tokens), float(sequences), float(backbone)],
                                                device=self.device)).tolist()
        out["tokens"], out["sequences"], out["backbone_tokens"] = tok, seqs, bb
        return out

    def _reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        if not sums:
            return {}
        keys = sorted(sums)
        stacked = all_reduce(torch.stack([sums[k] for k in keys]).to(self.device).float())
        return {k: (stacked[i, 0] / stacked[i, 1].clamp_min(1)).item() for i, k in enumerate(keys)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.policy.eval()
        bs = self.cfg.eval_batch_size
        sums: dict[str, torch.Tensor] = {}
        idx = self.eval_indices
        n_batches = math.ceil(len(idx) / bs)
        for b in tqdm(range(n_batches), desc="eval", leave=False, disable=not self.is_main or not sys.stderr.isatty()):
            mine, weight = self._share(idx[b * bs:(b + 1) * bs])
            batch = self._collate([self.eval_data.items[j] for j in mine])
            batch["example_index"], batch["split"] = mine, "test"
            _, metrics = batch_loss(self.cfg, self.policy, self._reference_logps, batch, self.device)
            self._accumulate(sums, metrics, weight)
        return self._reduce(sums)

    def _eval_and_log(self) -> dict:
        t = time.time()
        metrics = self.evaluate()
        self.writer.write({"split": "eval", "step": self.step, "examples": self.examples_seen, **metrics,
                           "eval_seconds": time.time() - t})
        if self.cfg.sample_during_eval:
            self._write_samples()
        self._export_at_eval(metrics)
        return metrics

    def _export_at_eval(self, metrics: dict) -> None:
        """``<run_dir>/step-<examples>/policy.pt`` ({"step_idx": examples, "state", "metrics": eval
        metrics}) at each evaluation during training, as the authors' trainer saves: not at 0
        examples and not at the final evaluation (those weights are LATEST/policy.pt). Off with
        ``export_at_eval=false`` or ``debug=true``; ``keep_eval_exports=K`` keeps the newest K."""
        cfg = self.cfg
        if not cfg.export_at_eval or cfg.debug or self.examples_seen == 0 or self.step >= self.total_steps:
            return
        ckpt.save_policy(self.run_dir, self.policy.lm, self.examples_seen, metrics, export_hf=False,
                         dest=f"step-{self.examples_seen}")
        if self.is_main and cfg.keep_eval_exports is not None:
            prune_eval_exports(self.run_dir, cfg.keep_eval_exports)

    def _write_samples(self) -> None:
        from .generate import generate_responses
        """Responses of the policy and, when one runs, the reference model (as the authors' trainer
        samples both) for the first ``n_eval_model_samples`` evaluation prompts, written to
        ``samples/step_<N>.json`` as ``{"prompt", "response", "reference_model_response", "reference"}``
        (``reference``: the dataset's preferred response)."""
        items = [self.eval_data.items[i] for i in self.eval_indices[: self.cfg.n_eval_model_samples]]
        prompts = [it.prompt for it in items]
        modes = [it.truncation_mode for it in items]
        bs = self.cfg.eval_batch_size // self.world or 1
        responses = generate_responses(self.policy, self.tokenizer, prompts, self.cfg, self.device, bs, modes)
        ref_responses = None
        if self.reference is not None:
            ref_responses = generate_responses(self.reference, self.tokenizer, prompts, self.cfg, self.device, bs, modes)
        if self.is_main:
            out = self.run_dir / "samples" / f"step_{self.step}.json"
            out.parent.mkdir(exist_ok=True)
            rows = []
            for i, (it, r) in enumerate(zip(items, responses)):
                row = {"prompt": it.prompt, "response": r}
                if ref_responses is not None:
                    row["reference_model_response"] = ref_responses[i]
                rows.append({**row, "reference": it.chosen})
            out.write_text(json.dumps(rows, indent=1))

    def save_resume(self) -> None:
        """A resume checkpoint of this step (a step saved already is re-saved atomically, see checkpoint.py).

        Weights holding NaN/Inf are never saved: RunError (exit 3), the last finite checkpoint stays.
        """
        if self.cfg.debug:
            return
        if not self._weights_finite():
            raise rundir.RunError(f"step {self.step}: the policy's weights hold NaN/Inf; not saving them. The last "
                                  f"finite checkpoint is kept: {ckpt.latest_resume(self.ckpt_root)}", exit_code=3)
        state = {"examples_seen": self.examples_seen, "next_eval": self.next_eval,
                 "metrics_records": self.writer.records if self.is_main else None,
                 "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run}
        path = ckpt.save_resume(self.ckpt_root, self.step, self.policy, self.optimizer, self.scheduler, state,
                                keep=self.cfg.keep_checkpoints)
        if self.is_main:
            log.info("resume checkpoint %s", path)

    def _weights_finite(self) -> bool:
        bad = torch.zeros(1, device=self.device)
        for p in self.policy.parameters():
            t = p.to_local() if hasattr(p, "to_local") else p
            bad = torch.maximum(bad, (~torch.isfinite(t.detach())).any().float().reshape(1))
        return float(all_reduce(bad, dist.ReduceOp.MAX if dist.is_initialized() else None).item()) == 0.0

    def _count_nonfinite(self, skipped: bool, metrics: dict, indices: list[int]) -> None:
        """Count a skipped non-finite step; after ``max_nonfinite_steps`` in a row stop with RunError (exit 3)."""
        if not skipped:
            self.nonfinite_run = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        limit = self.cfg.max_nonfinite_steps
        values = ", ".join(f"{k}={metrics[k]}" for k in ("loss", "grad_norm") if k in metrics)
        rows = [f"{i} ({src})" if (src := getattr(self.train_data.items[i], "source", "")) else str(i)
                for i in indices[:8]]
        examples = ", ".join(rows) + (f", ... ({len(indices)} in all)" if len(indices) > 8 else "")
        if self.nonfinite_run < limit:
            if self.is_main:
                log.warning("step %d: non-finite %s: optimizer step skipped (%d in a row; the run stops at %d); "
                            "batch examples: %s", self.step, values, self.nonfinite_run, limit, examples)
            return
        raise rundir.RunError(
            f"step {self.step}: non-finite {values}; {self.nonfinite_run} steps in a row were non-finite "
            f"(max_nonfinite_steps={limit}) and were skipped. Batch examples (index and row): {examples}. "
            f"Nothing non-finite was saved; the last checkpoint is {ckpt.latest_resume(self.ckpt_root)}. "
            "Lower lr (or check those rows) and start a new run.", exit_code=3)

    def _first_eval_record(self) -> dict | None:
        """The run's first evaluation, from metrics.jsonl (a resumed process did not run it)."""
        for rec in read_jsonl(self.run_dir / "metrics.jsonl"):
            if rec.get("split") == "eval":
                return {k: v for k, v in rec.items() if k not in ("split", "step", "examples", "eval_seconds")}
        return None

    # -- the loop
    def train(self) -> dict:
        cfg = self.cfg
        if self.finished:
            if self.is_main:
                log.info("%s already finished (DONE is there); use a new run_dir to train again", self.run_dir)
            summary = json.loads((self.run_dir / "DONE").read_text())
            if self.is_main and summary.get("policy"):
                print(f"   policy:  model.archive={summary['policy']}", flush=True)
            return summary
        self._install_signal_handlers()
        if self.resumed_from is not None:
            self.writer.write({"split": "train", "resumed_from_step": self.resumed_from, "step": self.step,
                               "examples": self.examples_seen})
        first_eval = last_eval = None
        if self.resumed_from is not None and self.is_main:
            first_eval = self._first_eval_record()
        tty = sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.loss.name}", unit="step",
                   disable=not (self.is_main and tty), dynamic_ncols=True,
                   mininterval=cfg.minimum_log_interval_secs)
        last_log = last_line = time.time()
        stopped = False
        while self.examples_seen < self.total_examples:
            if self.examples_seen >= self.next_eval:
                last_eval = self._eval_and_log()
                first_eval = first_eval or last_eval
                self.next_eval += cfg.eval_every
            count = min(cfg.batch_size, self.total_examples - self.examples_seen)
            if count < cfg.batch_size:
                break  # a partial final batch would change the per-example weighting; drop it like the reference
            indices = self._global_indices(self.examples_seen, count)
            self.throughput.start()
            metrics = self.train_step(indices)
            self.step += 1
            self.examples_seen += count
            tokens, sequences = metrics.pop("tokens"), metrics.pop("sequences")
            skipped = metrics.pop("nonfinite")
            metrics.update(self.throughput.stop(tokens, tokens / max(sequences, 1)))
            if "mfu" in metrics:  # FLOPs actually run: a packed layout runs fewer than the tokens it scores
                metrics["mfu"] *= metrics["backbone_tokens"] / max(tokens, 1)
            record = {"split": "train", "step": self.step, "examples": self.examples_seen, **metrics,
                      "skipped_nonfinite": self.nonfinite_total + skipped}
            self.writer.write(record)
            self._count_nonfinite(skipped, metrics, indices)
            bar.update(1)
            now = time.time()
            if now - last_log >= cfg.minimum_log_interval_secs:
                bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3g}" for k in ("loss", "rewards/accuracies")
                                 if k in metrics}, refresh=False)
                last_log = now
            if self.is_main and not tty and (now - last_line >= 30 or self.step in (1, self.total_steps)):
                # Logs (Slurm, CI) get one plain line every 30 s instead of carriage-return bar updates.
                acc = f" acc {metrics['rewards/accuracies']:.3f}" if "rewards/accuracies" in metrics else ""
                log.info("step %d/%d examples %d loss %.4f%s %.0f tok/s", self.step, self.total_steps,
                         self.examples_seen, metrics["loss"], acc, metrics["tokens_per_second"])
                last_line = now
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_resume()
            if self._should_stop():
                stopped = True
                break
        bar.close()
        if stopped:
            self.save_resume()
            if self.is_main:
                (self.run_dir / "STOP").unlink(missing_ok=True)
                log.info("stopped at step %d on request; rerun the same command to resume", self.step)
            self._barrier()
            return {"stopped": True, "step": self.step, "run_dir": str(self.run_dir)}
        self.save_resume()  # before the final evaluation: a rerun after a crash in the export repeats only that
        last_eval = self._eval_and_log()
        first_eval = first_eval or last_eval
        summary = {"step": self.step, "examples": self.examples_seen, "run_dir": str(self.run_dir),
                   "eval_first": first_eval, "eval_last": last_eval, "peak_memory_gb": peak_memory_gb(self.device)}
        policy_pt = ckpt.save_policy(self.run_dir, self.policy.lm, self.examples_seen, last_eval, self.tokenizer,
                                     export_hf=cfg.export_hf and not cfg.debug)
        if self.is_main:
            summary["policy"] = str(policy_pt)
            fault_point("before_done")
            tmp = self.run_dir / "DONE.tmp"
            tmp.write_text(json.dumps(summary, indent=2, default=float))
            os.replace(tmp, self.run_dir / "DONE")
            fault_point("after_done")
            print_summary(summary, cfg)
        self.writer.close()
        self._barrier()
        return summary


def prune_eval_exports(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``<run_dir>/step-<examples>`` exports; returns those deleted."""
    exports = sorted((p for p in run_dir.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                     key=lambda p: int(p.name[5:]))
    old = exports[:-keep] if keep > 0 else exports
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


def print_summary(summary: dict, cfg: DictConfig) -> None:
    keys = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen"]
    first, last = summary.get("eval_first") or {}, summary.get("eval_last") or {}
    print(f"\n== {cfg.loss.name} run finished: {summary['step']} steps, {summary['examples']} examples", flush=True)
    print(f"   run dir: {summary['run_dir']}\n   policy:  model.archive={summary.get('policy')}")
    print(f"   {'eval metric':<22}{'first':>12}{'last':>12}")
    for k in keys:
        if k in last:
            print(f"   {k:<22}{first.get(k, float('nan')):>12.4f}{last[k]:>12.4f}")
    sys.stdout.flush()


def main(overrides: list[str] | None = None) -> dict:
    """Run training in this process; torch.distributed is initialised from env vars under torchrun."""
    cfg = load_config(overrides)
    trainer = Trainer(cfg, overrides)
    try:
        return trainer.train()
    finally:
        if getattr(trainer, "lock", None) is not None:
            trainer.lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()
