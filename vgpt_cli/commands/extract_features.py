"""`vgpt extract-features`."""

from __future__ import annotations

import typer

from vgpt_cli.commands.common import not_built


def command(ctx: typer.Context) -> None:
    """Not built yet (issue #4).

    Example:

        vgpt extract-features --backbone tf_efficientnet_lite0
    """
    not_built("extract-features", 4)
