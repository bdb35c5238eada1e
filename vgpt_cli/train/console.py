"""Training's events on the terminal (stderr): a progress bar per phase, a table per validation, and
the messages. The one place in vgpt_cli/train/ that uses rich.

When stderr is not a terminal (a log file, nohup, a batch job) a live bar shows nothing until the end, so
progress becomes a plain line at most every `plain_every` seconds (and at the phase's last step)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from vgpt_cli.train.callbacks import TrainCallback

LABELS = {"xe": "cross-entropy", "scst": "SCST"}


class ConsoleReport(TrainCallback):
    def __init__(self, console: Console | None = None, progress: bool = True, plain_every: float = 60.0):
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.show_progress = progress
        self.plain_every = plain_every
        self._progress: Progress | None = None
        self._task: Any = None
        self._plain: dict[str, Any] | None = None  # phase, total, first step, start and last-line times

    def on_message(self, text: str, warning: bool = False) -> None:
        # plain text: a path or caption with "[...]" in it is not rich markup
        self.console.print(f"[yellow]{escape(text)}[/]" if warning else escape(text), highlight=False)

    def on_phase_start(self, phase: str, total: int, done: int) -> None:
        if self.show_progress and not self.console.is_terminal:
            now = time.monotonic()
            self._plain = {"phase": phase, "total": total, "done": done, "start": now, "last": now}
            return
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} tok/s"),
                                  TimeRemainingColumn(), console=self.console, disable=not self.show_progress,
                                  transient=False)
        self._progress.start()
        self._task = self._progress.add_task(LABELS.get(phase, phase), total=total, completed=done, loss="-",
                                             rate="-")

    def on_log(self, record: dict[str, Any]) -> None:
        if self._plain is not None:
            self._plain_line(record)
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], loss=f"{record['loss']:.4f}",
                                  rate=f"{record['tokens_per_s']:,.0f}")

    def on_validation(self, record: dict[str, Any], details: dict[str, Any]) -> None:
        table = Table(title=f"validation at {record['phase']} step {record['step']}", title_justify="left")
        for col in ("CIDEr-D", "best", "best step", "patience left", "seconds"):
            table.add_column(col, justify="right")
        table.add_row(f"{record['cider']:.4f}", f"{record['best_cider']:.4f}",
                      f"{record['best_phase']} {record['best_step']}", str(details["patience_left"]),
                      f"{details['seconds']:.1f}")
        self.console.print(table)
        for ex in details["examples"]:
            self.console.print(f"  [dim]{escape(str(ex['id']))}:[/] {escape(ex['caption'])}", highlight=False)

    def _plain_line(self, record: dict[str, Any]) -> None:
        p, now = self._plain, time.monotonic()
        step, total = record["step"], p["total"]
        if now - p["last"] < self.plain_every and step < total:
            return
        p["last"] = now
        done = step - p["done"]
        per_step = (now - p["start"]) / done if done > 0 else 0.0
        left = f", about {_minutes(per_step * (total - step))} left" if step < total and done > 0 else ""
        self.console.print(f"{LABELS.get(p['phase'], p['phase'])}: step {step}/{total}, loss {record['loss']:.4f}, "
                           f"{record['tokens_per_s']:,.0f} tok/s, {per_step:.1f} s/step{left}", highlight=False)

    def on_phase_end(self, phase: str) -> None:
        self._plain = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
