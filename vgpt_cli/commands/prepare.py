"""`vgpt prepare FORMAT`: one subcommand per registered dataset format (vgpt_cli.data.formats).
Option parsing and printing only."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from vgpt_cli.commands import options as opt
from vgpt_cli.commands.common import RateColumn, err, friendly_errors, print_json, with_parameters, workspace
from vgpt_cli.data.build import summary
from vgpt_cli.data.formats import DatasetFormat, Opt, formats
from vgpt_cli.data.manifest import Manifest


def progress_bar(unit: str) -> Progress:
    """A progress bar on stderr; bytes get a transfer speed, other units a rate."""
    if unit == "bytes":
        columns = (DownloadColumn(), TransferSpeedColumn())
    else:
        columns = (MofNCompleteColumn(), RateColumn(unit))
    return Progress(TextColumn("{task.description}"), BarColumn(), *columns, TimeRemainingColumn(),
                    console=err, transient=True)


def _report(manifest: Manifest, path: Path, as_json: bool) -> None:
    info = summary(manifest, path)
    name = manifest.dataset
    if as_json:
        print_json(info)
        return
    table = Table(title=f"dataset {name!r} ({manifest.format})", title_justify="left")
    for col in ("split", "images", "captions"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, c in info["counts"].items():
        table.add_row(split, f"{c['items']:,}", f"{c['captions']:,}")
    err.print(table)
    s = manifest.sampling
    what = (f"fraction {s['fraction']}" if s["fraction"] is not None
            else f"count {s['count']}" if s["count"] is not None else "the whole pool")
    err.print(f"sampled {what} of {s['pool_captions']:,} captions / {s['pool_images']:,} images "
              f"(unit {s['unit']}, seed {s['seed']})")
    for note in manifest.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    err.print(f"wrote {path}")
    err.print("next: [bold]vgpt extract-features[/]")


def _parameter(opt: Opt) -> inspect.Parameter:
    """The Typer parameter of one declaration, as a hand-written `name: Annotated[...] = default` would be."""
    optional = opt.default is None and not opt.required
    kind = typer.Argument(help=opt.help) if opt.positional else typer.Option(opt.cli_flag, help=opt.help)
    return inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY,
                             default=inspect.Parameter.empty if opt.required else opt.default,
                             annotation=Annotated[opt.type | None if optional else opt.type, kind])


def command_for(fmt: DatasetFormat) -> Callable[..., None]:
    """The subcommand of one format: its own options, then the shared ones, then --json."""

    @friendly_errors
    def command(ctx: typer.Context, **values: Any) -> None:
        as_json = values.pop("as_json")
        manifest, path = fmt.prepare(workspace(ctx), values, progress_bar)
        _report(manifest, path, as_json)

    with_parameters(command, [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
                              *(_parameter(opt) for opt in fmt.params()),
                              inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False,
                                                annotation=opt.Json)])
    command.__doc__ = fmt.doc()
    return command


def make_app(registered: Iterable[DatasetFormat]) -> typer.Typer:
    registered = list(registered)
    group = typer.Typer(
        help="Prepare a dataset manifest (splits, images, captions, few-shot sample) in the workspace.\n\n"
        f"Formats: {', '.join(f.name for f in registered)}.\n\n"
        "Example:\n\n    vgpt prepare coco --fraction 0.01\n\n    vgpt prepare shapes --count 2000",
        no_args_is_help=True,
    )
    for fmt in registered:
        group.command(fmt.name)(command_for(fmt))
    return group


app = make_app(formats())
