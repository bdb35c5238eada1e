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
        if name != "train":  # train's options come from TrainConfig (its own declaration rule)
            shared[name] = opt.help
    assert len(set(shared.values())) == 1 and "cuda:N or mps" in next(iter(shared.values()))


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
