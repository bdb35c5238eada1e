"""Training's events on the terminal (stderr): a progress bar per phase, a table per validation, and
the messages. The one place in vgpt_cli/train/ that uses rich."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from vgpt_cli.train.callbacks import TrainCallback

LABELS = {"xe": "cross-entropy", "scst": "SCST"}


class ConsoleReport(TrainCallback):
    def __init__(self, console: Console | None = None, progress: bool = True):
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.show_progress = progress
        self._progress: Progress | None = None
        self._task: Any = None

    def on_message(self, text: str, warning: bool = False) -> None:
        self.console.print(f"[yellow]{text}[/]" if warning else text, highlight=False)

    def on_phase_start(self, phase: str, total: int, done: int) -> None:
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} tok/s"),
                                  TimeRemainingColumn(), console=self.console, disable=not self.show_progress,
                                  transient=False)
        self._progress.start()
        self._task = self._progress.add_task(LABELS.get(phase, phase), total=total, completed=done, loss="-",
                                             rate="-")

    def on_log(self, record: dict[str, Any]) -> None:
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
            self.console.print(f"  [dim]{ex['id']}:[/] {ex['caption']}", highlight=False)

    def on_phase_end(self, phase: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
