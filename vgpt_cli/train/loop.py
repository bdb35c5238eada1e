"""`train(config, workspace)`: one run from start to end. `vgpt train`, the demo and the benchmarks call it.

It checks everything cheap first (options, data, the run folder and its lock, what a resume may
change), then builds or loads the model, runs cross-entropy and SCST (trainer.Trainer), and writes
result.json. What it reports goes to callbacks (callbacks.TrainCallback); with quiet=False the
console's progress bars and tables (console.ConsoleReport) are one of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from vgpt_cli.distributed import DistContext, setup_distributed
from vgpt_cli.errors import ConfigError, DataError, ModelLoadError
from vgpt_cli.files import atomic_write_json
from vgpt_cli.model.artifact import require_compatible
from vgpt_cli.model_folders import checkpoint_dir
from vgpt_cli.train.callbacks import Callbacks, StepHook, TrainCallback
from vgpt_cli.train.checkpoint import (
    finish_interrupted_swap,
    read_trainer_meta,
    remove_stale_temporaries,
    save_checkpoint,
)
from vgpt_cli.train.config import RESUME_LOCKED, TrainConfig
from vgpt_cli.train.run_folder import (
    RunLock,
    mark_ended,
    mark_started,
    read_run_config,
    remove_last,
    resumable_run,
)
from vgpt_cli.train.trainer import NonFiniteLossError as NonFiniteLossError
from vgpt_cli.train.trainer import Trainer, wrap_ddp
from vgpt_cli.workspace import Workspace

FALLBACK_LM = "smollm2-135m"


@dataclass
class TrainResult:
    run_dir: Path
    best_score: float | None  # best validation CIDEr-D (None without a validation split)
    best_step: int | None  # the step of its phase (best_phase) at which it was reached
    steps: int  # cross-entropy optimiser steps done
    scst_steps: int = 0
    stopped: str = ""  # why cross-entropy ended: max_steps, epochs, early_stopping
    last_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per optimiser step
    best_phase: str | None = None  # "xe" or "scst"

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "best_cider": self.best_score, "best_step": self.best_step,
                "best_phase": self.best_phase, "steps": self.steps, "scst_steps": self.scst_steps, "stopped": self.stopped,
                "last_loss": self.last_loss}


def build_model(config: TrainConfig, d_in: int, say: Callable[[str], None] = lambda s: None) -> Any:
    """Load the LM named by config.lm; with lm unset, GPT-2 if it loads offline, else SmolLM2-135M."""
    from vgpt_cli.model import Captioner

    model_part = config.part("model")
    if config.lm is not None:
        return Captioner.from_config(model_part.captioner_config(d_in).validate())
    try:
        return Captioner.from_config(model_part.captioner_config(d_in, "gpt2").validate())
    except ModelLoadError as e:
        say(f"GPT-2 cannot be loaded here ({e}); using {FALLBACK_LM} (pass --lm to choose)")
        return Captioner.from_config(model_part.captioner_config(d_in, FALLBACK_LM).validate())


# --- the entry point -------------------------------------------------------------------------------
def default_run_name() -> str:
    return datetime.now().strftime("run-%Y%m%d-%H%M%S")


def prepare_inputs(config: TrainConfig, workspace: Workspace, store: Any = None) -> tuple[Any, list, list, str]:
    """Manifest, feature store and the items to train and validate on; every data check, no model."""
    from vgpt_cli.data.manifest import Manifest

    dataset = config.dataset or workspace.current("dataset", "prepared dataset", "vgpt prepare ...")
    manifest = Manifest.load(workspace.manifest_path(dataset))
    train_items = manifest.items("train")
    if not train_items or not any(it.captions for it in train_items):
        raise DataError(f"{workspace.manifest_path(dataset)}: the train split has no captions; "
                        "rerun `vgpt prepare` with a larger --fraction")
    val_items = [it for it in manifest.splits.get("val", []) if it.captions]
    if config.val_size is not None:
        val_items = val_items[: config.val_size]
    if store is None:
        from vgpt_cli.features.store import open_workspace_store

        store = open_workspace_store(workspace)
    store.require([it.id for it in train_items] + [it.id for it in val_items])
    if config.attention_supervision:
        from vgpt_cli.train.attention_supervision import require_objects

        require_objects(train_items, dict(getattr(store, "meta", {}) or {}))
    return store, train_items, val_items, dataset


def train(config: TrainConfig, workspace: Workspace, *, resume: bool = False, model: Any = None,
          store: Any = None, on_step: Callable[[dict[str, Any]], None] | None = None,
          quiet: bool = False, keep_last: bool = False, callbacks: Sequence[TrainCallback] = ()) -> TrainResult:
    """Train a captioner on the workspace's dataset and features; returns where the run was written.

    model: an in-memory Captioner to train (tests, the demo); otherwise one is built from config.
        On resume the model always comes from the run's last/ checkpoint.
    resume: continue runs/<config.name>/last (optimiser, schedule, RNG and data position included).
    on_step: called with each optimiser step's record (phase, step, loss ...), e.g. to stop a run.
    quiet: no progress bars, tables or messages on stderr (the console is one of the callbacks).
    callbacks: more TrainCallback objects (progress, validations, the end of the run: on_end).
    keep_last: keep last/ when the run ends (to extend it later with --resume); by default it is removed.
    """
    config.validate()
    dist = setup_distributed(config.device)
    trainer = lock = None
    try:
        if config.precision == "fp16" and dist.device.type != "cuda":
            raise ConfigError("--precision fp16 needs a CUDA device; on the CPU use fp32 or bf16")
        store, train_items, val_items, dataset = prepare_inputs(config, workspace, store)
        name = config.name or (default_run_name() if not resume else None)
        if name is None:
            name = resumable_run(workspace)
        name = dist.broadcast_str(name)  # every process must agree on a timestamped name
        config = config.override(name=name, dataset=dataset)
        run_dir = workspace.run_dir(name)
        lock = RunLock(run_dir).acquire() if dist.is_main else None
        if dist.is_main:  # a kill between a save's renames left .last.old/ alone: put it back first
            for which in ("last", "best"):
                finish_interrupted_swap(run_dir, which)
        dist.barrier()
        n_examples = sum(len(it.captions) for it in train_items)
        if n_examples < dist.world_size * config.grad_accum:
            raise ConfigError(f"{n_examples} training captions cannot fill {dist.world_size} process(es) x "
                              f"--grad-accum {config.grad_accum}; lower --grad-accum")
        callback = _callbacks(callbacks, on_step, console=not quiet and dist.is_main)
        ckpt = None
        if resume:
            ckpt = checkpoint_dir(run_dir, "last")
            if ckpt is None:
                ended = (run_dir / "result.json").is_file()
                raise ConfigError(f"{run_dir}: no `last` checkpoint to resume; " + (
                    "the run ended and last/ was removed (--keep-last keeps it)" if ended else
                    "start it again without --resume"))
            read_trainer_meta(ckpt)  # a damaged trainer state fails here, before any model is loaded
            saved = read_run_config(run_dir)
            changed = [k for k in RESUME_LOCKED if k in saved and saved[k] != getattr(config, k)
                       and not (k == "lm" and config.lm is None)]
            if changed:
                raise ConfigError(f"{run_dir}/config.json: --resume cannot change {', '.join(changed)}; "
                                  "drop those options or start a new run with another --name")
            config = config.override(lm=saved.get("lm"))
        elif checkpoint_dir(run_dir, "last") is not None or (run_dir / "result.json").is_file():
            raise ConfigError(f"{run_dir}: a run with this name exists; pass --resume to continue it or "
                              "--name to start another")
        # The model comes last: every cheap check above has passed.
        torch.manual_seed(config.seed)
        if resume:  # the one model loader (API, evaluate, serve), then the checks that features fit it
            from vgpt_cli.model_folders import load_model

            model = load_model(ckpt, "cpu")
        elif model is None:
            model = build_model(config, int(store.dim), say=lambda s: callback.on_message(s, warning=True))
        require_compatible(model, store.dim, store.fingerprint, f"the feature store {store.path.name}",
                           "extract features with the matching backbone or start a new run", ConfigError)
        if config.lm is None:
            config = config.override(lm=model.config.lm)
        # Saved with every checkpoint (vgpt_cli.model.artifact): how images become the model's features (the
        # store's record, preprocessor.json); what it is validated and selected with, hence what `vgpt caption`,
        # `vgpt evaluate` and load_captioner decode with (vgpt_cli.model_folders.decode_options); and the
        # caption bank that consensus reranking reads.
        from dataclasses import asdict

        from vgpt_cli.decode import DecodeOptions
        from vgpt_cli.decode.consensus import CaptionBank

        model.preprocessor = dict(getattr(store, "meta", {}) or {}) or None
        model.generation = asdict(DecodeOptions(beam_size=config.val_beam, max_length=config.max_length,
                                                rerank=config.rerank))
        model.caption_bank = CaptionBank.from_store(store, train_items) if config.rerank else None
        model.to(dist.device)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "config.json", config.to_dict())
            if ckpt is None:  # a fresh start: no records of an earlier attempt that never checkpointed
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            for which in ("last", "best"):  # what saves that a kill interrupted left behind
                remove_stale_temporaries(run_dir, which)
            mark_started(workspace, config.name)
        trainer = Trainer(config, workspace, dist, model=model, store=store, train_items=train_items,
                          val_items=val_items, run_dir=run_dir, callback=callback)
        phase = "xe"
        meta_phase = None
        if ckpt is not None:
            meta_phase = read_trainer_meta(ckpt).get("phase", "xe")
        if meta_phase != "scst":
            trainer.setup_phase("xe")
            if ckpt is not None:
                trainer.restore(ckpt)
                callback.on_message(f"resuming {run_dir} at step {trainer.state['step']}")
                trainer.log({"event": "resume", "phase": "xe", "step": trainer.state["step"], "time": time.time()})
            else:
                callback.on_message(_summary(config, trainer, dist))
                if config.encoder_warm_start and config.max_steps != 0:
                    _warm_start(config, trainer, model, train_items, store, callback)
            if dist.enabled:
                trainer.model = wrap_ddp(model, dist.device)
            trainer.run_phase("xe")
        if config.scst and config.scst_epochs > 0:
            phase = "scst"
            core = trainer.core
            if meta_phase != "scst":
                best = checkpoint_dir(run_dir, "best")
                if best is not None:  # SCST starts from the best cross-entropy weights
                    dist.barrier()
                    from vgpt_cli.model import Captioner

                    core.load_state_dict(Captioner.from_pretrained(best).state_dict())
                trainer.state.update(phase="scst", step=0, bad_validations=0)
            trainer.model = core
            trainer.setup_phase("scst")
            if meta_phase == "scst":
                trainer.restore(ckpt)
                callback.on_message(f"resuming SCST in {run_dir} at step {trainer.state['step']}")
                trainer.log({"event": "resume", "phase": "scst", "step": trainer.state["step"], "time": time.time()})
            if dist.enabled:
                trainer.model = wrap_ddp(core, dist.device)
            trainer.run_phase("scst")
        st = trainer.state
        if not val_items and dist.is_main:  # no validation split: the final weights are the best we know
            save_checkpoint(trainer.core, run_dir, "best")
        result = TrainResult(run_dir=run_dir, best_score=st["best_score"], best_step=st["best_step"],
                             best_phase=st["best_phase"],
                             steps=st["xe_steps"], scst_steps=st["step"] if phase == "scst" else 0,
                             stopped=st["stopped"], last_loss=trainer.history[-1]["loss"] if trainer.history else None,
                             history=trainer.history)
        if dist.is_main:
            atomic_write_json(run_dir / "result.json", result.to_dict())
            mark_ended(workspace, config.name)
            if not keep_last:  # the run cannot be resumed any more: drop the optimiser state
                remove_last(run_dir)
            callback.on_end(result)  # the run's end: everything it wrote is in place
        return result
    finally:
        if trainer is not None:
            if dist.is_main:  # curves.png from metrics.jsonl, however the run ended (never raises)
                from vgpt_cli.train.curves import finish_run

                finish_run(trainer.run_dir, trainer.callback.on_message)
            trainer.close()
        if lock is not None:
            lock.release()
        dist.close()


def _warm_start(config: TrainConfig, trainer: Trainer, model: Any, train_items: Sequence[Any], store: Any,
                callback: Callbacks) -> None:
    """A fresh run's encoder warm start (train/warm_start.py), before the first SRAU step and any
    checkpoint: a run killed during it starts again from the beginning."""
    from vgpt_cli.train.warm_start import warm_start_encoder

    dtype = torch.bfloat16 if config.precision == "bf16" else None  # fp16 would need a loss scaler here
    r = warm_start_encoder(model, train_items, store, config.encoder_warm_start, seed=config.seed,
                           autocast_dtype=dtype, log=callback.on_message)
    trainer.log({"event": "encoder_warm_start", "phase": "xe", "step": 0, "epochs": r.epochs, "losses": r.losses,
                 "vocabulary": r.vocabulary, "seconds": r.seconds, "time": time.time()})


def _callbacks(extra: Sequence[TrainCallback], on_step: Callable[[dict[str, Any]], None] | None,
               console: bool) -> Callbacks:
    callbacks = list(extra)
    if console:
        from vgpt_cli.train.console import ConsoleReport  # rich: only where something is printed

        callbacks.insert(0, ConsoleReport())
    if on_step is not None:
        callbacks.append(StepHook(on_step))
    return Callbacks(callbacks)


def _summary(config: TrainConfig, trainer: Trainer, dist: DistContext) -> str:
    plan = trainer.plan
    n_params = sum(p.numel() for p in trainer.core.parameters())
    new = sum(p.numel() for p in trainer.core.param_groups()["new"])
    return (f"training {config.name}: {len(trainer.examples)} captions of {len(trainer.train_items)} items, "
            f"{len(trainer.val_items)} validation items; LM {config.lm} ({n_params / 1e6:.1f}M parameters, "
            f"{new / 1e6:.1f}M new); effective batch {plan.global_batch} = {config.batch_size} x "
            f"{config.grad_accum} accum x {dist.world_size} process(es); {trainer.total} steps; device {dist.device}")

