"""`vgpt evaluate`."""

from __future__ import annotations

import typer

from vgpt_cli.commands.common import not_built


def command(ctx: typer.Context) -> None:
    """Not built yet (issue #6).

    Example:

        vgpt evaluate --split test
    """
    not_built("evaluate", 6)
