"""The training loop: one process (BasicTrainer) or FSDP2 under torchrun (FSDPTrainer).

``Trainer`` wires the components, each in its own module: the process and what crosses
ranks (``distributed.py``), the examples, their order and each micro-batch's layout
(``schedule.py``, ``layout.py``), the models (``model.py``), reference log-probs live or
cached (``reference.py``), the loss of a batch (``losses.py``), checkpoints and resume
(``checkpoint.py``), the run directory's lock, stop requests and DONE (``rundir.py``) and
metrics (``metrics.py``). What is left here reads in the order it runs: set up, then the
loop (``train``), one optimizer step (``train_step``) and evaluation (``evaluate``).
"""
from __future__ import annotations

import functools
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from caldpo.files import json_text, write_output
from caldpo.kernels import resolve_backend
from caldpo.kernels.options import from_config as kernel_options_from_config

from . import checkpoint as ckpt
from . import rundir
from .config import (TRAINERS, ConfigError, check_run_dir, load_config, run_dir as cfg_run_dir, validate,
                     write_run_config)
from .distributed import MetricSums, Process
from .faults import fault_point
from .attention import packed_attention
from .layout import resolve_layout
from .losses import batch_loss
from .host import SYNCS
from .metrics import FlopCount, MetricsWriter, Throughput, peak_memory_gb, read_jsonl
from .model import (DTYPES, LogProbModel, apply_activation_checkpointing, apply_archive, check_attention,
                    check_embedding_covers_tokenizer, check_vocab_and_positions, count_matmul_params,
                    load_archive_state, load_causal_lm, load_tokenizer, model_path)
from .reference import ReferenceLogps, build_cache, cache_key, load_reference
from .schedule import BatchSchedule, Collator, Examples, evaluation_indices

__all__ = ["Examples", "Trainer", "main"]

log = logging.getLogger("caldpo")

# Host numbers of each micro-batch (schedule.Collator) summed over a step and over ranks.
STEP_COUNTS = ("tokens", "sequences", "backbone_tokens", "useful_tokens", "attention_context", "scored_tokens")


class Trainer:
    """One training run of ``cfg`` (a composed config, ``config.load_config``).

    Raises ConfigError (bad options, data or model setup: exit 2), data.DataError, and
    rundir.RunError (a run directory in use or damaged, NaN weights: its ``exit_code``).
    """

    def __init__(self, cfg: DictConfig, argv: list[str] | None = None):
        self.cfg = cfg
        validate(cfg, argv=argv)  # the one preflight, before any process group, data or model
        self.process = Process.setup(cfg.device, fsdp=TRAINERS[cfg.trainer] == "fsdp")
        self.device, self.is_main, self.world = self.process.device, self.process.is_main, self.process.world
        if self.device.type == "cuda":  # fp32 matmuls (fp32 weights without mixed precision) on TF32 cores
            torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
        self.run_dir = cfg_run_dir(cfg).resolve()
        other_changes = check_run_dir(cfg, self.run_dir)  # a stored run with other training options: stop
        self.sft = cfg.loss.name == "sft"
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
        self.finished = rundir.read_done(self.run_dir) if cfg.resume == "auto" else None
        if self.finished is not None:
            return
        self.lock = self._lock_run_dir()
        if self.is_main:
            write_run_config(cfg, self.run_dir)  # once, when the run starts fresh
        self.process.barrier()

        # kernels, tokenizer, data
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
        self.train_data = Examples(cfg, "train", self.sft, self.is_main, self.tokenizer, process=self.process)
        if len(self.train_data) < cfg.batch_size:
            n = len(self.train_data)
            raise ConfigError(f"batch_size={cfg.batch_size}: the training split holds {n} training "
                              f"example{'' if n == 1 else 's'} after loading, not one full batch; lower batch_size "
                              "or add data")
        self.schedule = BatchSchedule(len(self.train_data), cfg.seed, batch_size=cfg.batch_size,
                                      rank=self.process.rank, world=self.world,
                                      accumulation_steps=cfg.gradient_accumulation_steps,
                                      groups=self.train_data.group_of, n_groups=self.train_data.n_groups,
                                      ranks=self.train_data.rank_of)
        self.total_steps = self.schedule.steps(cfg.n_epochs, cfg.n_examples)  # the reference iterator's batches
        if self.total_steps < 1:
            raise ConfigError(f"n_epochs={cfg.n_epochs}: the run would train no step; use n_epochs >= 1 "
                              "(or n_examples)")
        fault_point("data_load")
        self.eval_data = Examples(cfg, "test", self.sft, self.is_main, self.tokenizer, process=self.process)
        self.eval_indices = evaluation_indices(self.eval_data.epoch_order(cfg.seed), cfg.n_eval_examples,
                                               cfg.eval_batch_size)

        # layout and models
        attn = check_attention(cfg, self.device)
        self.layout = resolve_layout(cfg.layout, attn, self.device.type)
        attn = packed_attention(cfg.model.attn_implementation, attn, self.layout, self.device,
                                self._compute_dtypes())
        self.attn = attn
        # Dense 4D masks cost O(row length^2): rows hold at most the longest segment. A block mask
        # skips empty blocks, so flex attention takes the whole micro-batch as one row; so do
        # segments (varlen), which need no padding at all.
        self.collate = Collator(self.tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                                layout=self.layout, sft=self.sft,
                                row_tokens=0 if attn in ("flex_attention", "varlen") else None,
                                segments=attn == "varlen")
        archive = load_archive_state(cfg.model.archive) if cfg.model.archive else None
        lm = load_causal_lm(cfg, path, DTYPES[cfg.model.policy_dtype], attn)
        if archive is not None:
            apply_archive(lm, archive, cfg.model.archive)
        self.n_params, self.n_layers, self.hidden, self.vocab = count_matmul_params(lm)
        self.head_params = lm.get_output_embeddings().weight.numel()
        check_embedding_covers_tokenizer(lm, self.tokenizer)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(lm, cfg.model.block_name)
        if cfg.compile:
            lm.base_model.compile()
        self.policy = LogProbModel(lm, self.backend, options=self.kernel_options)
        self.process.place(self.policy, cfg, trainable=True)
        self.reference, self.reference_logps = None, None
        reference_model = functools.partial(load_reference, cfg, path, attn, archive, self.process, self.backend,
                                            self.kernel_options)
        if not self.sft:  # reference_free too: its rewards and calibration terms keep h = log pi - log pi_ref
            if cfg.reference.mode == "model":
                self.reference = reference_model()
                self.reference_logps = ReferenceLogps(self.device, model=self.reference)
            else:
                splits = {"train": self.train_data, "test": self.eval_data}
                cache = build_cache(cfg, self.process, splits, self.collate, reference_model,
                                    cache_key(cfg, path, splits.values(), self.tokenizer), self.run_dir)
                self.reference_logps = ReferenceLogps(self.device, cache=cache)
        del reference_model, archive  # the SFT weights are in the models now
        if self.is_main:
            log.info("model %s (%s), %.1fM matmul params, attention=%s, layout=%s, kernels=%s, trainer=%s, world=%d, "
                     "device=%s", cfg.model.preset, path, self.n_params / 1e6, attn, self.layout, self.backend,
                     "FSDP2" if self.process.fsdp else "single", self.world, self.device)

        # optimizer, schedule, resume, metrics
        self.optimizer = getattr(torch.optim, cfg.optimizer)(
            [p for p in self.policy.parameters() if p.requires_grad],
            lr=cfg.lr, **({"weight_decay": cfg.weight_decay} if cfg.weight_decay else {}))
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.step = self.examples_seen = 0
        self.next_eval = 0 if cfg.do_first_eval else cfg.eval_every
        self.nonfinite_total = self.nonfinite_run = 0  # skipped non-finite steps: all, and in a row
        self.resumed_from, keep_records = None, None  # keep_records: metrics.jsonl lines kept (None: all)
        self.ckpt_root = self.run_dir / "checkpoints"
        if cfg.resume == "auto":
            state, keep_records = ckpt.resume_newest(self.ckpt_root, self.run_dir, self.policy, self.optimizer,
                                                     self.scheduler, announce=self.is_main)
            if state is not None:
                self.step = self.resumed_from = int(state["step"])
                self.examples_seen, self.next_eval = int(state["examples_seen"]), int(state["next_eval"])
                self.nonfinite_total = int(state.get("nonfinite_total", 0))
                self.nonfinite_run = int(state.get("nonfinite_run", 0))
                self._check_data_unchanged(state)
                if self.is_main:
                    log.info("resumed from %s (step %d, %d examples seen)", state["checkpoint"], self.step,
                             self.examples_seen)
        elif (self.run_dir / "metrics.jsonl").exists() or ckpt.latest_resume(self.ckpt_root) is not None:
            raise ConfigError(f"resume=never but run_dir={self.run_dir} already holds a run; "
                              "choose a new run_dir, or resume=auto to continue it")
        self.writer = MetricsWriter(self.run_dir, cfg, enabled=self.is_main, keep_records=keep_records)
        flops = FlopCount(self.n_params - self.head_params, self.head_params, self.n_layers, self.hidden,
                          reference=self.reference is not None)
        self.throughput = Throughput(flops, self.device, world=self.world)

    def _compute_dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtypes the policy (its mixed-precision dtype under FSDP2, else its parameters') and, when
        it runs, the reference compute in on this device."""
        cfg = self.cfg
        mp = cfg.model.fsdp_policy_mp if self.process.fsdp else None
        out = [DTYPES[mp or cfg.model.policy_dtype]]
        if not self.sft:  # the reference runs for every preference loss, reference_free included
            ref = DTYPES[cfg.model.reference_dtype]
            out.append(torch.float32 if self.device.type == "cpu" and ref == torch.float16 else ref)
        return tuple(out)

    def _lock_run_dir(self) -> rundir.RunLock | None:
        """Rank 0 locks the run directory before anything in it is written; every rank learns the outcome."""
        lock, error = None, None
        if self.is_main:
            try:
                lock = rundir.RunLock(self.run_dir)
            except rundir.RunError as e:
                error = str(e)
        error = self.process.from_main(error)
        if error:
            raise rundir.RunError(error)
        return lock

    # -- the loop
    def train(self) -> dict:
        """Train to ``n_examples`` (or ``n_epochs``), evaluating every ``eval_every`` examples; returns the summary.

        A stop request (SIGTERM, SIGUSR1, Ctrl-C, ``<run_dir>/STOP``) saves a resume checkpoint at the
        next step boundary and returns ``{"stopped": True, "stopped_by": ..., "step", "run_dir"}``.
        """
        cfg = self.cfg
        if self.finished is not None:
            if self.is_main:
                log.info("%s already finished (DONE is there); use a new run_dir to train again", self.run_dir)
                if self.finished.get("policy"):
                    print(f"   policy:  model.archive={self.finished['policy']}", flush=True)
            return self.finished
        self.signals.install()
        first_eval = last_eval = None
        if self.resumed_from is not None:
            # a split of its own: a reader of "train" records sees each step once
            self.writer.write({"split": "resume", "resumed_from_step": self.resumed_from, "step": self.step,
                               "examples": self.examples_seen})
            first_eval = self._first_eval_record() if self.is_main else None
        tty = sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.loss.name}", unit="step",
                   disable=not (self.is_main and tty), dynamic_ncols=True,
                   mininterval=cfg.minimum_log_interval_secs)
        last_log = last_line = time.time()
        stopped_by = None
        while self.step < self.total_steps:
            if self.examples_seen >= self.next_eval:
                last_eval = self._eval_and_log()
                first_eval = first_eval or last_eval
                self.next_eval += cfg.eval_every
            indices = self.schedule.indices(self.examples_seen, cfg.batch_size)
            syncs_before = SYNCS.count
            self.throughput.start()
            metrics = self.train_step(indices)
            self.step += 1
            self.examples_seen += cfg.batch_size
            work = {k: metrics.pop(k) for k in ("useful_tokens", "attention_context", "scored_tokens")}
            tokens = metrics.pop("tokens")
            metrics.pop("sequences")
            skipped, stop = metrics.pop("nonfinite"), metrics.pop("stop_requested")
            metrics.update(self.throughput.stop(tokens, **work))  # the step's second host sync
            metrics["useful_tokens"] = work["useful_tokens"]
            metrics["host_syncs"] = SYNCS.count - syncs_before
            self.writer.write({"split": "train", "step": self.step, "examples": self.examples_seen, **metrics,
                               "skipped_nonfinite": self.nonfinite_total + skipped})
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
            if stop:
                stopped_by = self._stop_reason()
                break
        bar.close()
        if stopped_by:
            self.save_resume()
            if self.is_main:
                rundir.clear_stop(self.run_dir)
                log.info("stopped at step %d on request (%s); rerun the same command to resume", self.step, stopped_by)
            self.process.barrier()
            return {"stopped": True, "stopped_by": stopped_by, "step": self.step, "run_dir": str(self.run_dir)}
        self.save_resume()  # before the final evaluation: a rerun after a crash in the export repeats only that
        last_eval = self._eval_and_log()
        first_eval = first_eval or last_eval
        summary = {"step": self.step, "examples": self.examples_seen, "run_dir": str(self.run_dir),
                   "eval_first": first_eval, "eval_last": last_eval, "peak_memory_gb": peak_memory_gb(self.device)}
        policy_pt = ckpt.save_policy(self.run_dir, self.policy.lm, self.examples_seen, last_eval, self.tokenizer,
                                     export_hf=cfg.export_hf and not cfg.debug)
        if self.is_main:
            summary["policy"] = str(policy_pt)
            rundir.write_done(self.run_dir, summary)
            print_summary(summary, cfg)
        self.writer.close()
        self.process.barrier()
        return summary

    def _local_stop(self) -> str | None:
        """The stop request this rank has seen: a signal's name, "STOP" for the file (rank 0 reads it), or None."""
        return self.signals.reason or ("STOP" if self.is_main and rundir.stop_requested(self.run_dir) else None)

    def _stop_reason(self) -> str:
        """Why the run stops, once every rank knows that some rank saw a request: rank 0's reason, else this one's."""
        local = self._local_stop()
        return self.process.from_main(local) or local or "STOP"

    # -- one optimizer step
    def train_step(self, indices: list[int]) -> dict:
        """Forward and backward over this rank's micro-batches of the step's ``indices``, then one optimizer
        step (skipped when the loss or the gradient norm is non-finite on any rank). Returns the means of
        the per-example metrics over all ranks, plus grad_norm, lr, nonfinite, stop_requested (a stop
        request seen by any rank, agreed in the same collective as nonfinite), and the micro-batches'
        counts (``STEP_COUNTS``: tokens, sequences, backbone tokens, MFU's work) summed over ranks.
        One host sync (``MetricSums.means``); host-to-device copies are pinned and non-blocking."""
        self.policy.train()
        ga = self.cfg.gradient_accumulation_steps
        sums = MetricSums()
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # on the device: no sync per micro-batch
        for chunk in self.schedule.micro_batches(indices):
            batch = self.collate([self.train_data.items[j] for j in chunk], chunk, "train")
            loss, metrics = batch_loss(self.cfg, self.policy, self.reference_logps, batch, self.device)
            nonfinite |= ~torch.isfinite(loss.detach())
            (loss / ga).backward()
            sums.add(metrics)
            sums.add_totals(**{k: batch[k] for k in STEP_COUNTS})
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        fault_point("mid_step", self.step + 1)
        # The step's one host sync: metric means, token counts, the non-finite skip and a stop request
        # (any rank), and the grad norm, in one collective and one read-back (MetricSums.means).
        out = sums.means(self.process, main={"grad_norm": grad_norm},
                         flags={"nonfinite": nonfinite | ~torch.isfinite(grad_norm),
                                "stop_requested": self._local_stop() is not None})
        if not out["nonfinite"]:  # a non-finite loss or gradient: no optimizer or scheduler step (train() counts it)
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out["lr"] = self.scheduler.get_last_lr()[0]
        return out

    # -- evaluation, exports, checkpoints
    @torch.no_grad()
    def evaluate(self) -> dict:
        self.policy.eval()
        bs = self.cfg.eval_batch_size
        sums = MetricSums()
        idx = self.eval_indices
        n_batches = math.ceil(len(idx) / bs)
        for b in tqdm(range(n_batches), desc="eval", leave=False, disable=not self.is_main or not sys.stderr.isatty()):
            mine, weight = self.process.share(idx[b * bs:(b + 1) * bs], bs)
            batch = self.collate([self.eval_data.items[j] for j in mine], mine, "test")
            _, metrics = batch_loss(self.cfg, self.policy, self.reference_logps, batch, self.device)
            sums.add(metrics, weight)
        return sums.means(self.process)

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
        """Responses of the policy and, when one runs, the reference model (as the authors' trainer
        samples both) for the first ``n_eval_model_samples`` evaluation prompts, written to
        ``samples/step_<N>.json`` as ``{"prompt", "response", "reference_model_response", "reference"}``
        (``reference``: the dataset's preferred response)."""
        from .generate import generate_responses

        items = [self.eval_data.items[i] for i in self.eval_indices[: self.cfg.n_eval_model_samples]]
        prompts = [it.prompt for it in items]
        modes = [it.truncation_mode for it in items]
        bs = self.cfg.eval_batch_size // self.world or 1
        responses = generate_responses(self.policy, self.tokenizer, prompts, self.cfg, self.device, bs, modes)
        ref_responses = None
        if self.reference is not None:
            ref_responses = generate_responses(self.reference, self.tokenizer, prompts, self.cfg, self.device, bs, modes)
        if self.is_main:
            rows = []
            for i, (it, r) in enumerate(zip(items, responses)):
                row = {"prompt": it.prompt, "response": r}
                if ref_responses is not None:
                    row["reference_model_response"] = ref_responses[i]
                rows.append({**row, "reference": it.chosen})
            write_output(self.run_dir / "samples" / f"step_{self.step}.json", json_text(rows, indent=1), "samples")

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
                 "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run,
                 "data": self._data_identity()}
        path = ckpt.save_resume(self.ckpt_root, self.step, self.policy, self.optimizer, self.scheduler, state,
                                keep=self.cfg.keep_checkpoints)
        if self.is_main:
            log.info("resume checkpoint %s", path)

    def _data_identity(self) -> dict[str, dict]:
        """What each split's examples are, as a checkpoint records them: ``Examples.fingerprint``, the number
        of examples and the files they were read from."""
        return {split: {"fingerprint": ex.fingerprint, "examples": len(ex), "files": ex.sources}
                for split, ex in (("train", self.train_data), ("test", self.eval_data))}

    def _check_data_unchanged(self, state: dict) -> None:
        """Resume only on the examples the checkpoint trained on: the data position is a count of examples
        into their order, so changed data (rows edited, added, removed, reordered) would silently train and
        evaluate on others. RunError (exit 2) naming each changed split and its files, or with
        ``data.on_change=continue`` a warning. A checkpoint of an older caldpo records nothing: a log line."""
        step, saved = int(state["step"]), state.get("data")
        if not saved:
            if self.is_main:
                log.warning("checkpoint step_%d records no fingerprint of its data (written by an older caldpo): "
                            "resuming without checking that the data is unchanged", step)
            return
        changed = []
        for split, now in self._data_identity().items():
            then = saved.get(split) or {}
            if then.get("fingerprint") == now["fingerprint"]:
                continue
            n_then, n_now = then.get("examples", "?"), now["examples"]
            what = (f"{n_then} examples at the checkpoint, {n_now} now" if n_then != n_now
                    else f"{n_now} examples, but their content or order differs")
            changed.append(f"the {split} split ({now['files']}): {what}")
        if not changed:
            return
        detail = "; ".join(changed)
        if self.cfg.data.on_change == "continue":
            if self.is_main:
                log.warning("the data changed since checkpoint step_%d was written (%s); resuming on the changed data "
                            "(data.on_change=continue): the data position continues from the checkpoint", step, detail)
            return
        raise rundir.RunError(
            f"cannot resume {self.run_dir} from checkpoint step_{step}: the data changed since it was written: "
            f"{detail}. The run's data position is a count of examples into their order, so it would continue on "
            "other examples than the ones it trained on. Restore the data the run started with; or start a new run "
            "(another run_dir); or resume on the changed data with data.on_change=continue")

    def _weights_finite(self) -> bool:
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for p in self.policy.parameters():
            t = p.to_local() if hasattr(p, "to_local") else p
            bad |= ~torch.isfinite(t.detach()).all()
        return not self.process.any(bad)

    def _count_nonfinite(self, skipped: bool, metrics: dict, indices: list[int]) -> None:
        """Count a skipped non-finite step; after ``max_nonfinite_steps`` in a row stop with RunError (exit 3)."""
        if not skipped:
            self.nonfinite_run = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        limit = self.cfg.max_nonfinite_steps
        shown = [k for k in ("loss", "grad_norm") if k in metrics]
        values = ", ".join(f"{k}={metrics[k]}" for k in shown if not math.isfinite(metrics[k]))
        finite = ", ".join(f"{k}={metrics[k]:.6g}" for k in shown if math.isfinite(metrics[k]))
        values += f" ({finite})" if finite else ""
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
        trainer.process.close()
