"""`vgpt train`: option parsing and printing only; the loop is vgpt_cli.train.train."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from vgpt_cli.commands.common import err, friendly_errors, print_json, workspace
from vgpt_cli.train.config import DEFAULT_XE_STEPS, PRESETS, TrainConfig  # no torch: the options' one source

_DEFAULTS, _PAPER = TrainConfig(), PRESETS["paper"]


def show(value: object) -> str:
    """An option value as the help writes it: 1e-3, 0.2, 16, on, unset."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "unset"
    if isinstance(value, float) and value and abs(value) < 0.01:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def d(name: str) -> str:
    """TrainConfig's default of an option, for its help text (so the help cannot drift from it)."""
    return show(getattr(_DEFAULTS, name))


def paper(name: str) -> str:
    """The paper preset's value of an option (PRESETS["paper"]), for its help text."""
    return show(_PAPER[name]) if name in _PAPER else d(name)


def _opt(*names: str, help: str, **kw):  # noqa: A002 - typer's own keyword
    # No default here: an unset flag is None and never overrides TrainConfig (or a --config file).
    return typer.Option(*names, help=help, show_default=False, **kw)


@friendly_errors
def command(
    ctx: typer.Context,
    config: Annotated[Path | None, _opt("--config", help="YAML or JSON file of options (keys as the flags, "
                                        "e.g. lm-lr: 1e-5); flags given here override it.")] = None,
    preset: Annotated[str | None, _opt("--preset", help="Start from a named recipe: vgpt (the defaults, measured "
                                       f"best here) or paper (the authors': K {paper('encoder_layers')}, their gate "
                                       f"init, lr {paper('lr')}, batch {paper('batch_size')}) or demo (`vgpt demo`'s "
                                       "shapes recipe: SRAU, the LM frozen). Other options override it.")] = None,
    lm: Annotated[str | None, _opt("--lm", help="Language model: hub name (gpt2), local folder, .gguf file or "
                                   "smollm2-135m. Default: GPT-2 if it loads offline, else smollm2-135m.")] = None,
    lm_init: Annotated[str | None, _opt("--lm-init", help=f"pretrained or random (ablation) (default {d('lm_init')}).")] = None,
    tau: Annotated[float | None, _opt("--tau", help=f"SRAU gate threshold, 0 <= tau < 0.5 (default {d('tau')}).")] = None,
    encoder_layers: Annotated[int | None, _opt("--encoder-layers", help=f"K, visual encoder layers (default {d('encoder_layers')}; paper {paper('encoder_layers')}).")] = None,
    gating: Annotated[str | None, _opt("--gating", help="none (plain cross-attention) or srau (VisualGPT's "
                                       f"self-resurrecting gates; --tau and the gate start apply) (default {d('gating')}).")] = None,
    coverage: Annotated[float | None, _opt("--coverage", help="Coverage in the cross-attention (not in the paper): "
                                           "a learned per-head penalty on looking again where the caption already "
                                           f"looked, starting at this weight (default {d('coverage')}).")] = None,
    lr: Annotated[float | None, _opt("--lr", help=f"AdamW learning rate of the new parameters (default {d('lr')}; "
                                 f"paper {paper('lr')}).")] = None,
    lm_lr: Annotated[float | None, _opt("--lm-lr", help="Learning rate of the pretrained LM's parameters "
                                        f"(default {d('lm_lr')}; paper: same as --lr).")] = None,
    encoder_warm_start: Annotated[int | None, _opt("--encoder-warm-start", help="Epochs of training the visual "
                                                   "encoder alone under a small word decoder before SRAU "
                                                   f"training (default {d('encoder_warm_start')}; paper "
                                                   f"{paper('encoder_warm_start')}).")] = None,
    warmup: Annotated[int | None, _opt("--warmup", help=f"Linear warm-up steps (default {d('warmup')}; paper {paper('warmup')}).")] = None,
    schedule: Annotated[str | None, _opt("--schedule", help=f"cosine, linear or constant (default {d('schedule')}; paper {paper('schedule')}).")] = None,
    batch_size: Annotated[int | None, _opt("--batch-size", help="Captions per micro-batch per process "
                                           f"(default {d('batch_size')}; paper {paper('batch_size')}).")] = None,
    grad_accum: Annotated[int | None, _opt("--grad-accum", help="Micro-batches per optimiser step; effective "
                                           f"batch = batch x accum x processes (default {d('grad_accum')}).")] = None,
    epochs: Annotated[int | None, _opt("--epochs", help="Cross-entropy epochs (default: "
                                     f"{DEFAULT_XE_STEPS} steps, whatever the data's size; paper: {paper('epochs')} "
                                     "with early stopping).")] = None,
    max_steps: Annotated[int | None, _opt("--max-steps", help="Cross-entropy optimiser steps (overrides "
                                          "--epochs).")] = None,
    label_smoothing: Annotated[float | None, _opt("--label-smoothing", help=f"Default {d('label_smoothing')}.")] = None,
    unlikelihood: Annotated[float | None, _opt("--unlikelihood", help="Weight of token-level unlikelihood "
                                               "training against repeating an earlier word of the caption, "
                                               f"0 = off (default {d('unlikelihood')}).")] = None,
    attention_supervision: Annotated[float | None, _opt(
        "--attention-supervision", help="Weight of supervised cross-attention: the query before each shape word "
        "is pushed onto that object's grid cells (needs scenes that record their objects: `vgpt prepare "
        f"shapes`), 0 = off (default {d('attention_supervision')}).")] = None,
    precision: Annotated[str | None, _opt("--precision", help="fp32, bf16 or fp16 (autocast; fp16 needs CUDA) "
                                          f"(default {d('precision')}).")] = None,
    seed: Annotated[int | None, _opt("--seed", help="Seed of initialisation, data order and dropout "
                                     f"(default {d('seed')}).")] = None,
    patience: Annotated[int | None, _opt("--patience", help="Stop cross-entropy after this many validations "
                                         f"without a better CIDEr (default {d('patience')}).")] = None,
    val_every: Annotated[int | None, _opt("--val-every", help="Validate every N steps and at the end (default: "
                                          "at each epoch's end).")] = None,
    val_size: Annotated[int | None, _opt("--val-size", help="Validate on at most N items.")] = None,
    max_length: Annotated[int | None, _opt("--max-length", help=f"Caption tokens incl. EOS (default {d('max_length')}).")] = None,
    scst: Annotated[bool | None, _opt("--scst/--no-scst", help="Self-critical training (CIDEr-D reward) after "
                                      "cross-entropy, from the best checkpoint.")] = None,
    scst_lr: Annotated[float | None, _opt("--scst-lr", help=f"SCST learning rate (default {d('scst_lr')}).")] = None,
    scst_epochs: Annotated[int | None, _opt("--scst-epochs", help=f"SCST epochs (default {d('scst_epochs')}).")] = None,
    scst_samples: Annotated[int | None, _opt("--scst-samples", help="Sampled captions per image in SCST; their "
                                             f"mean reward is the baseline (default {d('scst_samples')}).")] = None,
    save_every: Annotated[int | None, _opt("--save-every", help="Also write last/ every N steps (default: at "
                                           "each validation and at the end).")] = None,
    dataset: Annotated[str | None, _opt("--dataset", help="Dataset name in the workspace (default: the current "
                                        "one, from the last `vgpt prepare`).")] = None,
    device: Annotated[str | None, _opt("--device", help=f"auto, cpu, cuda, cuda:N or mps (default {d('device')}).")] = None,
    name: Annotated[str | None, _opt("--name", help="Run folder name under runs/ (default: a timestamp).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run named by --name (default: the "
                                         "interrupted run, else the workspace's current run) from its last "
                                         "checkpoint.")] = False,
    keep_last: Annotated[bool, typer.Option("--keep-last", help="Keep last/ (optimiser state, about 3x the model) "
                                            "when the run ends, to extend it later with --resume.")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also write TensorBoard event files, live, "
                                              "into runs/<name>/tensorboard/ (needs the tensorboard package); "
                                              "view with: tensorboard --logdir runs")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Train a VisualGPT captioner on the workspace's dataset and cached features.

    With no options: the recipe measured best on real photos (docs/results.md, "Real photographs"): plain cross-attention from the pretrained LM to K = {encoder_layers} encoder level, {encoder_warm_start} epochs of encoder warm start, the LM frozen for the first {freeze_lm_steps} steps, AdamW {lr} for the new parameters and {lm_lr} for the LM, warm-up {warmup} then {schedule}, batches of {batch_size} captions for {xe_steps} steps (--epochs or --max-steps to change), validation CIDEr-D choosing best/; GPT-2 when it can be loaded, else SmolLM2-135M. VisualGPT's gated cross-attention (SRAU) is --gating srau (tau {tau}, gates starting at sigmoid({gate_init_bias}): the shapes demo's recipe); --preset paper gives the authors' recipe (SRAU, K = {paper_encoder_layers}, their gate init, lr {paper_lr}, batch {paper_batch_size}).

    Writes runs/<name>/: config.json, metrics.jsonl, curves.png (loss, validation CIDEr-D, mean visual gate), best/ (the model to use) and, while the run can be resumed, last/; with --tensorboard also tensorboard/.

    Several GPUs or processes: torchrun --nproc-per-node N -m vgpt_cli train ...

    Example:

        vgpt train

        vgpt train --gating srau --tau 0.2 --name srau1

        vgpt train --lm gpt2 --batch-size 50 --scst --name r1

        vgpt train --preset paper --lm gpt2

        vgpt train --config train.yaml --lr 5e-5

        vgpt train --resume --name r1
    """
    from vgpt_cli.train import load_config_file, train
    from vgpt_cli.train.loop import default_run_name
    from vgpt_cli.train.run_folder import folder_size, human_size, read_run_config, resumable_run

    ws = workspace(ctx)
    flags = dict(preset=preset, lm=lm, lm_init=lm_init, tau=tau, encoder_layers=encoder_layers, gating=gating, coverage=coverage, lr=lr, lm_lr=lm_lr,
                 encoder_warm_start=encoder_warm_start, warmup=warmup, schedule=schedule, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
                 max_steps=max_steps, label_smoothing=label_smoothing, unlikelihood=unlikelihood,
                 attention_supervision=attention_supervision, precision=precision, seed=seed,
                 patience=patience, val_every=val_every, val_size=val_size, max_length=max_length, scst=scst,
                 scst_lr=scst_lr, scst_epochs=scst_epochs, scst_samples=scst_samples, save_every=save_every,
                 dataset=dataset, device=device, name=name)
    if resume:
        # A resumed run starts from its saved config; flags given now override it (architecture excepted).
        run = name or resumable_run(ws)
        base = TrainConfig.from_dict(read_run_config(ws.run_dir(run)), source=str(ws.run_dir(run) / "config.json"))
        flags["name"] = run
    else:
        if config is not None and config.is_file():
            _check_utf8(config)
        if config is not None:
            base = load_config_file(config, preset=preset)
        else:
            base = TrainConfig.from_preset(preset or "vgpt")
        flags["name"] = name or default_run_name()  # known here, so an interrupt can print the resume command
    cfg = base.override(**flags).validate()
    mirror = None
    if tensorboard and int(os.environ.get("RANK", "0")) == 0:
        from vgpt_cli.train.curves import TensorBoardMirror

        mirror = TensorBoardMirror(ws.run_dir(cfg.name))  # fails here, before training, without tensorboard
    try:
        result = train(cfg, ws, resume=resume, keep_last=keep_last,
                       on_step=None if mirror is None else lambda record: mirror.sync())
    except KeyboardInterrupt:
        from vgpt_cli.model_folders import checkpoint_dir

        if checkpoint_dir(ws.run_dir(cfg.name), "last") is None:
            err.print("[yellow]interrupted[/] before the first checkpoint; nothing to resume, run the command again",
                      highlight=False)
        else:
            err.print(f"[yellow]interrupted[/]; the last checkpoint was kept. Resume with:\n  vgpt -w {ws.root} "
                      f"train --resume --name {cfg.name}", highlight=False)
        raise typer.Exit(code=130) from None
    finally:
        if mirror is not None:
            mirror.close()  # the records after the last step (its validation) too
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return

    best = result.run_dir / "best"
    score = "n/a (no validation split)" if result.best_score is None else f"{result.best_score:.4f}"
    err.print(f"[bold green]done[/]: {result.steps} cross-entropy steps"
              + (f" + {result.scst_steps} SCST steps" if result.scst_steps else "")
              + f" ({result.stopped}); best validation CIDEr-D {score}"
              + (f" at {result.best_phase} step {result.best_step}" if result.best_step is not None else ""),
              highlight=False)
    kept = "last/ (resumable state)" if (result.run_dir / "last").is_dir() else "no last/ (--keep-last keeps it)"
    extra = "curves.png, " if (result.run_dir / "curves.png").is_file() else ""
    extra += "tensorboard/, " if mirror is not None else ""
    best_note = ""
    if best.is_dir():
        by_reference = "lm_weights" in json.loads((best / "config.json").read_text(encoding="utf-8"))
        best_note = f", {human_size(folder_size(best))}" + (", the unchanged LM kept by reference" if by_reference else "")
    err.print(f"wrote {result.run_dir}/ ({human_size(folder_size(result.run_dir))}): config.json, metrics.jsonl, "
              f"{extra}best/ (the model to use{best_note}), {kept}", highlight=False)
    err.print(f"next: vgpt evaluate --split test   (uses {best})", highlight=False)
    if json_out:
        print_json(result.to_dict())


# The help's defaults, from TrainConfig and PRESETS (tests/test_train.py checks every "(default X" too).
command.__doc__ = command.__doc__.format(
    **{k: d(k) for k in ("tau", "encoder_layers", "gate_init_bias", "encoder_warm_start", "freeze_lm_steps", "lr",
                         "lm_lr", "warmup", "schedule", "batch_size")},
    **{f"paper_{k}": paper(k) for k in ("encoder_layers", "lr", "batch_size")}, xe_steps=DEFAULT_XE_STEPS)


def _check_utf8(path: Path) -> None:
    """A --config file that is not UTF-8 text: one line, not a decoding traceback."""
    from vgpt_cli.errors import ConfigError

    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the config file as "
                          "UTF-8") from None
