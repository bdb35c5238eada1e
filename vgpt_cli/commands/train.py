"""`vgpt train`: option parsing and printing only; the loop is vgpt_cli.train.train."""

from __future__ import annotations

import inspect
import json
import os
import typing
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from vgpt_cli.commands import options as opt
from vgpt_cli.commands.common import err, friendly_errors, print_json, with_parameters, workspace
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


def _flag_help(f) -> str:
    """A TrainConfig field's flag help: its own text, then "(default X; paper Y)" from TrainConfig and PRESETS."""
    meta = f.metadata
    default = meta["default_text"] if meta["default_text"] is not None else f" {d(f.name)}"
    if meta["paper_text"]:  # words, not a value: "paper: same as --lr"
        paper_value = f": {meta['paper_text']}"
    elif f.name in _PAPER and _PAPER[f.name] != getattr(_DEFAULTS, f.name):
        paper_value = f" {paper(f.name)}"
    else:
        paper_value = ""
    if f.type in ("bool", bool) or (not default and not paper_value):
        return meta["help"]
    return f"{meta['help'].rstrip('.')} (default{default}" + (f"; paper{paper_value}" if paper_value else "") + ")."


def train_flags() -> list[inspect.Parameter]:
    """One keyword parameter per TrainConfig field declared with config.flag: its flag names and help from
    the field, no default of its own (an unset flag is None and never overrides TrainConfig or a --config
    file). The preset first, then the fields in TrainConfig's order."""
    hints = typing.get_type_hints(TrainConfig)
    offered = sorted((f for f in fields(TrainConfig) if "help" in f.metadata), key=lambda f: f.name != "preset")
    params = []
    for f in offered:
        base = hints[f.name]
        base = next((t for t in typing.get_args(base) if t is not type(None)), base)  # X | None -> X
        option = typer.Option(*(f.metadata["decls"] or (f"--{f.name.replace('_', '-')}",)), help=_flag_help(f),
                              show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[base | None, option]))
    return params


@friendly_errors
def command(ctx: typer.Context, config: Path | None = None, resume: bool = False, keep_last: bool = False,
            tensorboard: bool = False, json_out: bool = False, **flags: object) -> None:
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
    preset, name = flags["preset"], flags["name"]
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

# The command's own options, then one per TrainConfig flag field (train_flags).
_OWN = [
    inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Path | None, typer.Option("--config", show_default=False, help="YAML or JSON file of options (keys as the "
                                  "flags, e.g. lm-lr: 1e-5); flags given here override it.")]),
]
_RUN = [
    inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--resume", help="Continue the run named by --name (default: the interrupted run, else the workspace's "
        "current run) from its last checkpoint.")]),
    inspect.Parameter("keep_last", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--keep-last", help="Keep last/ (optimiser state, about 3x the model) when the run ends, to extend it later "
        "with --resume.")]),
    inspect.Parameter("tensorboard", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--tensorboard", help="Also write TensorBoard event files, live, into "
                           "runs/<name>/tensorboard/ (needs the tensorboard package); view with: tensorboard "
                           "--logdir runs")]),
    inspect.Parameter("json_out", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=opt.Json),
]
with_parameters(command, [*_OWN, *train_flags(), *_RUN])


def _check_utf8(path: Path) -> None:
    """A --config file that is not UTF-8 text: one line, not a decoding traceback."""
    from vgpt_cli.errors import ConfigError

    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the config file as "
                          "UTF-8") from None
