"""The phases of a run, step by step: data for each step, the objective, the optimiser step, logging,
validation, checkpoints, and what a resume restores.

Exactness rule that the tests check: the data order of epoch e depends only on (seed, e), and the
checkpoint holds the RNG, optimiser, scheduler and grad-scaler state, so a run resumed at step k
repeats the uninterrupted run's losses and ends with the same weights, bit for bit.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from vgpt_cli.distributed import DistContext
from vgpt_cli.errors import ConfigError, VgptError
from vgpt_cli.model_folders import checkpoint_dir
from vgpt_cli.train.callbacks import TrainCallback
from vgpt_cli.train.checkpoint import load_trainer_state, restore_rng, rng_tensors, save_checkpoint
from vgpt_cli.train.config import TrainConfig
from vgpt_cli.train.data import (
    Batch,
    Example,
    caption_examples,
    collate,
    epoch_order,
    image_groups,
    make_plan,
    pad_features,
)
from vgpt_cli.train.objectives import cross_entropy_step, scst_step
from vgpt_cli.train.optim import OptimiserStep, constant_factor, lr_factor
from vgpt_cli.train.run_folder import metrics_size, truncate_metrics
from vgpt_cli.train.validation import Validator, record_score, should_stop, validation_due
from vgpt_cli.workspace import Workspace


class NonFiniteLossError(VgptError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


def wrap_ddp(model: Any, device: torch.device) -> Any:
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class Trainer:
    def __init__(self, config: TrainConfig, workspace: Workspace, dist: DistContext, *, model: Any, store: Any,
                 train_items: Sequence[Any], val_items: Sequence[Any], run_dir: Path,
                 callback: TrainCallback | None = None):
        self.cfg, self.ws, self.dist = config, workspace, dist
        self.device = dist.device
        self.model = model
        self.store = store
        self.train_items, self.val_items = list(train_items), list(val_items)
        self.examples: list[Example] = caption_examples(self.train_items)
        self._groups = image_groups(self.examples)
        self.run_dir = run_dir
        self.callback = callback or TrainCallback()
        self.backbone = dict(getattr(store, "meta", {}) or {})
        self.state: dict[str, Any] = {"phase": "xe", "step": 0, "xe_steps": 0, "best_score": None,
                                      "best_step": None, "best_phase": None, "bad_validations": 0, "stopped": "", "validations": 0}
        self.history: list[dict[str, Any]] = []
        self.validator = Validator(self.val_items, store, dist, beam=config.val_beam, max_length=config.max_length,
                                   precision=config.precision)
        self._reward_scorer = None
        self._order_cache: tuple[Any, list[int]] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._lm_frozen = False
        self.last_gate: float | None = None  # the mean visual gate of the last cross-entropy step
        self.attention_targets = self._attention_targets() if config.attention_supervision else None

    def _attention_targets(self) -> dict:
        """Each training caption's supervised shape words and their objects' cells (attention_supervision.py)."""
        from vgpt_cli.train.attention_supervision import grid_cells_for, shapes_targets

        n_tokens = int(self.store.get(self.train_items[0].id).shape[0])
        try:
            cells_of = grid_cells_for(self.backbone, n_tokens)
        except ValueError as e:  # not a square grid of tokens
            raise ConfigError(f"--attention-supervision: {e}") from None
        return shapes_targets(self.train_items, self.core.tokenizer, cells_of)

    @property
    def core(self) -> Any:
        """The unwrapped Captioner (DDP wraps it as .module)."""
        return self.model.module if hasattr(self.model, "module") else self.model

    def log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def order(self, epoch: int, n: int, salt: int = 0) -> list[int]:
        key = (epoch, n, salt)
        if self._order_cache is None or self._order_cache[0] != key:
            groups = self._groups if (salt == 0 and self.cfg.group_by_image) else None
            self._order_cache = (key, epoch_order(n, self.cfg.seed + salt, epoch, groups))
        return self._order_cache[1]

    @property
    def reward_scorer(self) -> Any:
        # SCST reward: CIDEr-D with document frequencies from the training captions (the paper's choice).
        if self._reward_scorer is None:
            from vgpt_cli.evaluate.metrics import CiderD

            self._reward_scorer = CiderD([it.captions for it in self.train_items])
        return self._reward_scorer

    # .. one step of each phase ........................................................................
    def xe_batches(self, step: int) -> list[Batch]:
        epoch, pos = divmod(step, self.plan.steps_per_epoch)
        order = self.order(epoch, len(self.examples))
        micro = self.plan.micro_batches(order, pos, self.dist.rank)
        return [collate(self.store, self.core, [self.examples[i] for i in mb], self.cfg.max_length,
                        self.attention_targets) for mb in micro]

    def xe_step(self, batches: list[Batch]) -> tuple[float, int]:
        loss, tokens, self.last_gate = cross_entropy_step(self.model, batches, self.dist, self.optim.backward,
                                                          precision=self.cfg.precision,
                                                          label_smoothing=self.cfg.label_smoothing,
                                                          unlikelihood=self.cfg.unlikelihood,
                                                          attention_supervision=self.cfg.attention_supervision)
        return loss, tokens

    def scst_step(self, step: int) -> tuple[float, int]:
        epoch, pos = divmod(step, self.scst_plan.steps_per_epoch)
        order = self.order(epoch, len(self.train_items), salt=7919)
        (ids,) = self.scst_plan.micro_batches(order, pos, self.dist.rank)
        items = [self.train_items[i] for i in ids]
        feats, lengths = pad_features([self.store.get(it.id) for it in items])
        loss, tokens, self.last_reward = scst_step(
            self.model, self.core, feats.to(self.device), lengths.to(self.device), [it.captions for it in items],
            self.reward_scorer, self.dist, self.optim.backward, samples_per_image=self.cfg.scst_samples,
            max_length=self.cfg.max_length, precision=self.cfg.precision)
        return loss, tokens

    def enter_step(self, phase: str, step: int) -> None:
        """Soft gates and a frozen LM during the first steps of cross-entropy (TrainConfig); off in SCST."""
        cfg, core = self.cfg, self.core
        xe = phase == "xe"
        core.tau_override = 0.0 if xe and step < cfg.soft_gate_steps else None
        frozen = xe and step < cfg.freeze_lm_steps
        if frozen != self._lm_frozen:
            # No gradient means AdamW skips the LM's tensors (no update, no decay), and backward
            # computes no weight gradients for them.
            for p in core.lm.parameters():
                p.requires_grad_(not frozen)
            self._lm_frozen = frozen
            if self.dist.enabled and phase != "done":
                self.model = wrap_ddp(core, self.device)  # DDP fixes the trainable set when it is built

    # .. validation ...................................................................................
    def validate(self, step: int) -> bool:
        """Score, keep `best/` when it improved, log it. True when cross-entropy should stop early."""
        st = self.state
        score = self.validator(self.core)
        improved = record_score(st, score, step)
        if self.dist.is_main:
            if improved:
                save_checkpoint(self.core, self.run_dir, "best")
            record = {"event": "validation", "phase": st["phase"], "step": step, "cider": score,
                      "best_cider": st["best_score"], "best_step": st["best_step"],
                      "best_phase": st["best_phase"], "improved": improved,
                      "bad_validations": st["bad_validations"], "time": time.time()}
            self.log(record)
            self.callback.on_validation(record, dict(self.validator.details,
                                                     patience_left=self.cfg.patience - st["bad_validations"]))
        return should_stop(st, self.cfg.patience)

    # .. checkpoints ..................................................................................
    def save_last(self) -> None:
        if not self.dist.is_main:
            return
        opt_meta, tensors = self.optim.state()
        tensors.update(rng_tensors())
        state = dict(self.state, **opt_meta, config=self.cfg.to_dict(), saved=time.time(),
                     metrics_bytes=metrics_size(self.run_dir))
        save_checkpoint(self.core, self.run_dir, "last", state, tensors)

    def restore(self, ckpt: Path) -> None:
        meta, tensors = load_trainer_state(ckpt)
        if self.dist.is_main:  # the steps after this checkpoint are trained and logged again
            truncate_metrics(self.run_dir, meta.get("metrics_bytes"))
        for key in self.state:
            if key in meta:
                self.state[key] = meta[key]
        self.optim.load_state(meta, tensors)
        restore_rng(tensors)

    # .. phases .......................................................................................
    def setup_phase(self, phase: str) -> int:
        """Optimiser, schedule and step plan of a phase; returns its total number of optimiser steps."""
        cfg, dist = self.cfg, self.dist
        if phase == "xe":
            self.plan = make_plan(len(self.examples), cfg.batch_size, cfg.grad_accum, dist.world_size)
            total = cfg.xe_steps(self.plan.steps_per_epoch)
            if cfg.soft_gate_steps and cfg.soft_gate_steps >= total:
                raise ConfigError(f"--soft-gate-steps {cfg.soft_gate_steps}: must be fewer than the {total} "
                                  "cross-entropy steps (the model is validated and kept with its own tau)")
            lr, lm_lr, factor = cfg.lr, cfg.resolved_lm_lr, lr_factor(cfg.schedule, cfg.warmup, total)
        else:
            self.scst_plan = make_plan(len(self.train_items), cfg.scst_batch_size, 1, dist.world_size)
            total = cfg.scst_epochs * self.scst_plan.steps_per_epoch
            lr, lm_lr, factor = cfg.scst_lr, cfg.scst_lr, constant_factor
        self.optim = OptimiserStep(self.core, lr=lr, lm_lr=lm_lr, weight_decay=cfg.weight_decay, factor=factor,
                                   clip_grad=cfg.clip_grad, device_type=self.device.type, fp16=cfg.precision == "fp16")
        self.total = total
        return total

    def run_phase(self, phase: str) -> None:
        cfg, st, total = self.cfg, self.state, self.total
        per_epoch = self.plan.steps_per_epoch if phase == "xe" else self.scst_plan.steps_per_epoch
        window_tokens, window_start = 0, time.perf_counter()
        pending = None
        self.callback.on_phase_start(phase, total, st["step"])
        try:
            # a resumed run that stopped early stays stopped (SCST still follows it)
            while st["step"] < total and not (phase == "xe" and st["stopped"] == "early_stopping"):
                step = st["step"]
                self.enter_step(phase, step)
                if phase == "xe":
                    batches = pending.result() if pending is not None else self.xe_batches(step)
                    # Load the next step's batches in a thread while this step computes.
                    pending = self._pool.submit(self.xe_batches, step + 1) if step + 1 < total else None
                    loss, tokens = self.xe_step(batches)
                    if pending is not None:
                        pending.result()  # never tokenise in two threads at once (validation decodes)
                else:
                    loss, tokens = self.scst_step(step)
                if not math.isfinite(loss):
                    last = checkpoint_dir(self.run_dir, "last")
                    raise NonFiniteLossError(
                        f"{phase} step {step + 1}: the loss is {loss}; training stopped. The last good checkpoint "
                        f"is {last or 'not written yet'}; lower --lr, use --precision fp32 or raise --warmup, "
                        "then rerun (add --resume to continue from it)")
                lr = self.optim.lr  # the rate this step uses (before the schedule moves)
                self.optim.step()
                st["step"] = step + 1
                if phase == "xe":
                    st["xe_steps"] = st["step"]
                window_tokens += tokens
                record = {"phase": phase, "step": st["step"], "epoch": step // per_epoch, "loss": loss,
                          "lr": lr, "tokens": tokens}
                if phase == "scst":
                    record["reward"] = self.last_reward
                elif self.last_gate is not None:
                    record["visual_gate"] = self.last_gate
                self.history.append(record)
                done_epoch = st["step"] % per_epoch == 0
                if st["step"] % cfg.log_every == 0 or st["step"] == total or done_epoch:
                    rate = window_tokens / max(1e-9, time.perf_counter() - window_start)
                    logged = dict(record, tokens_per_s=rate, time=time.time())
                    self.log(logged)
                    if self.dist.is_main:
                        self.callback.on_log(logged)
                    window_tokens, window_start = 0, time.perf_counter()
                stop = False
                if self.val_items and validation_due(st["step"], total, val_every=cfg.val_every, epoch_done=done_epoch,
                                                     gates_soft_until=cfg.soft_gate_steps * (phase == "xe")):
                    stop = self.validate(st["step"])
                    window_start = time.perf_counter()
                    due = True
                else:
                    due = st["step"] == total or bool(cfg.save_every and st["step"] % cfg.save_every == 0)
                if due:
                    if stop:
                        st["stopped"] = "early_stopping"
                    self.save_last()
                    self.dist.barrier()
                self.callback.on_step(record)  # after the checkpoint: a hook that raises acts as a kill
                if stop:
                    break
        finally:
            self.callback.on_phase_end(phase)
        self.enter_step("done", 0)
        if phase == "xe" and not st["stopped"]:
            st["stopped"] = cfg.length_limit

    def close(self) -> None:
        self._pool.shutdown(wait=True)
