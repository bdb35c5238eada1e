"""What every command shares: the workspace from the global option, consoles, error mapping."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from vgpt_cli.errors import VgptError
from vgpt_cli.workspace import Workspace

# stdout carries only results (captions, JSON); everything else goes to stderr.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

def say(message: str) -> None:
    """A progress or log line on stderr, as plain text: "[train] ..." or a path with brackets is not markup."""
    err.print(message, highlight=False, markup=False)


def workspace(ctx: typer.Context) -> Workspace:
    obj = ctx.find_root().obj or {}
    ws = obj.get("workspace")
    return ws if ws is not None else Workspace.from_option(None)


def with_parameters(fn: F, params: list[inspect.Parameter]) -> F:
    """A command whose options are generated (train's from TrainConfig, prepare's from its formats): Typer
    reads the parameters from __signature__ and their types from __annotations__, so both are set here."""
    fn.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return fn


def friendly_errors(fn: F) -> F:
    """Turn a VgptError into one red line on stderr and its exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VgptError as e:
            # escaped: a message is plain text; "vgpt[serve]" or "xattn[i]" are not rich markup
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(code=e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]; finished work was kept, rerun the same command to resume")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


class RateColumn(ProgressColumn):
    """Items per second for a progress bar, e.g. '812 scenes/s' or, with decimals=1, '3.4 img/s'."""

    def __init__(self, unit: str, decimals: int = 0) -> None:
        super().__init__()
        self.unit = unit
        self.decimals = decimals

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.{self.decimals}f} {self.unit}/s" if task.speed else f"- {self.unit}/s")


def print_table(table: Table) -> None:
    """On a terminal, fit it; piped or captured, never wrap a row (tests and scripts read the lines)."""
    (out if out.is_terminal else Console(width=250, soft_wrap=True)).print(table)


@contextlib.contextmanager
def decode_progress():
    """A progress bar on stderr with a rate; yields progress(total) -> advance(n)."""
    with Progress(TextColumn("decoding"), BarColumn(), MofNCompleteColumn(), RateColumn("img", decimals=1),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        def progress(total: int):
            task = bar.add_task("decoding", total=total)
            return lambda n: bar.advance(task, n)

        yield progress


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def not_built(command: str, issue: int) -> None:
    err.print(f"vgpt {command}: not built yet (issue #{issue}); nothing was done")
    raise typer.Exit(code=2)
