"""`vgpt prepare FORMAT`: one subcommand per dataset format."""

from __future__ import annotations

import typer

from vgpt_cli.commands.common import not_built

app = typer.Typer(
    help="Prepare a dataset manifest (splits, images, captions, few-shot sample) in the workspace.\n\n"
    "Example:\n\n    vgpt prepare coco --fraction 0.01",
    no_args_is_help=False,
)


@app.callback(invoke_without_command=True)
def command(ctx: typer.Context) -> None:
    """Prepare a dataset manifest. Not built yet (issue #3).

    Example:

        vgpt prepare coco --fraction 0.01
    """
    if ctx.invoked_subcommand is None and not ctx.resilient_parsing:
        not_built("prepare", 3)
