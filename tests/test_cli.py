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
