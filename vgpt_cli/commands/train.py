"""`vgpt train`."""

from __future__ import annotations

import typer

from vgpt_cli.commands.common import not_built


def command(ctx: typer.Context) -> None:
    """Not built yet (issue #5).

    Example:

        vgpt train --lm gpt2 --tau 0.2
    """
    not_built("train", 5)
