"""The Typer app: global options and command registration only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vgpt_cli import __version__
from vgpt_cli.commands import caption, demo, evaluate, extract_features, prepare, serve, train
from vgpt_cli.workspace import WORKSPACE_ENV, Workspace

app = typer.Typer(
    name="vgpt",
    help="Data-efficient image captioning with VisualGPT.\n\n"
    "A pretrained language model becomes the caption decoder, joined to the image through "
    "self-resurrecting gated cross-attention (SRAU). Typical use:\n\n"
    "    vgpt prepare coco --fraction 0.01\n\n"
    "    vgpt extract-features\n\n"
    "    vgpt train\n\n"
    "    vgpt evaluate --split test\n\n"
    "    vgpt caption img.jpg",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vgpt {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    ctx: typer.Context,
    workspace: Annotated[
        Path | None,
        typer.Option(
            "--workspace", "-w", envvar=WORKSPACE_ENV, file_okay=False,
            help="Workspace folder where every step reads and writes (default: the current folder).",
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    ctx.obj = {"workspace": Workspace.from_option(workspace)}


app.add_typer(prepare.app, name="prepare")
app.command("extract-features")(extract_features.command)
app.command("train")(train.command)
app.command("caption")(caption.command)
app.command("evaluate")(evaluate.command)
app.command("demo")(demo.command)
app.command("serve")(serve.command)


def main() -> None:
    app()
