import re

import pytest
from typer.testing import CliRunner

from vgpt_cli import __version__
from vgpt_cli.cli import app

runner = CliRunner()
# from the app itself, so a new command is covered without editing this list
COMMANDS = [c.name for c in app.registered_commands] + [g.name for g in app.registered_groups]


def test_the_app_has_the_commands_users_were_promised():
    assert {"prepare", "extract-features", "train", "caption", "evaluate", "serve", "demo"} <= set(COMMANDS)


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert re.search(rf"\b{name}\b", result.output), name


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_help_shows_an_example(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert f"vgpt {name}" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"vgpt {__version__}"


@pytest.mark.parametrize("weight", ["-1", "nan", "inf"])
def test_demo_refuses_a_bad_attention_supervision_weight_before_any_work(tmp_path, weight):
    result = runner.invoke(app, ["-w", str(tmp_path / "ws"), "demo", "--attention-supervision", weight])
    assert result.exit_code == 2, result.output
    said = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())  # rich wraps the message in a box
    assert "--attention-supervision" in said and "must be a finite weight >= 0" in said
    assert not (tmp_path / "ws" / "sources").exists()  # no scenes were rendered


def test_every_device_option_is_one_declaration_that_takes_any_device_name():
    import typer.main

    commands = typer.main.get_command(app).commands
    shared = {}
    for name in ("extract-features", "caption", "evaluate", "serve", "demo", "train"):
        opt = next(p for p in commands[name].params if "--device" in p.opts)
        assert opt.default is None, name  # auto, resolved by vgpt_cli.device.resolve_device
        shared[name] = opt.help
    from vgpt_cli.device import DEVICE_HELP

    assert set(shared.values()) == {DEVICE_HELP} and "cuda:N or mps" in DEVICE_HELP  # train's too, from TrainConfig


# options that mean the same in every command that has them: one declaration (commands/common.py)
SHARED_OPTIONS = ("--device", "--model", "--json", "--beam-size", "--precision", "--workspace")


def test_a_shared_option_has_one_help_and_one_default_in_every_command():
    """An option that several commands share is declared once: the same help and default wherever it
    appears (train's and demo's --precision are training's autocast, a setting of its own)."""
    import typer.main

    root = typer.main.get_command(app)
    seen: dict[str, set] = {}
    for name, cmd in root.commands.items():
        subcommands = getattr(cmd, "commands", None) or {name: cmd}
        for sub in subcommands.values():
            for p in sub.params:
                flag = next((o for o in p.opts if o in SHARED_OPTIONS), None)
                if flag is None or (name in ("train", "demo") and flag == "--precision"):  # training's autocast
                    continue
                seen.setdefault(flag, set()).add((p.help, repr(p.default)))
    assert {"--device", "--model", "--json", "--beam-size", "--precision"} <= set(seen)
    assert {flag: len(v) for flag, v in seen.items()} == {flag: 1 for flag in seen}, seen


def test_every_train_flag_is_a_train_config_field_declared_once():
    """`vgpt train`'s flags are generated from TrainConfig's fields (vgpt_cli.train.config.flag): each
    flag's help starts with its field's own text, and every field declared as a flag is offered."""
    from dataclasses import fields

    import typer.main

    from vgpt_cli.train.config import TrainConfig

    params = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    declared = {f.name: f.metadata["help"] for f in fields(TrainConfig) if "help" in f.metadata}
    assert len(declared) >= 30 and set(declared) <= set(params)
    for name, help_text in declared.items():
        assert params[name].help.startswith(help_text.rstrip(".")), name
        assert params[name].default is None, name  # unset: never overrides TrainConfig or a --config file
    own = set(params) - set(declared)
    assert own == {"config", "resume", "keep_last", "tensorboard", "json_out"}, own


@pytest.mark.parametrize("device, said", [("mps", "MPS is not available here"), ("cuda:1", "no CUDA GPU"),
                                          ("tpu", "use auto, cpu, cuda, cuda:N or mps")])
def test_a_device_that_is_not_here_is_one_line_before_any_work(tmp_path, device, said):
    import torch

    if torch.cuda.is_available() or (device == "mps" and torch.backends.mps.is_available()):
        pytest.skip("this machine has the device")
    result = runner.invoke(app, ["-w", str(tmp_path / "ws"), "demo", "--device", device])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert said in " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    assert not (tmp_path / "ws").exists()  # nothing was written
