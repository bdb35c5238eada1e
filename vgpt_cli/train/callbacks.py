"""What training tells the outside world, as events: progress, validations, messages, the end.

The loop calls one `TrainCallback` (a `Callbacks` list of them); it prints nothing itself. `vgpt train`
and `train(quiet=False)` add `console.ConsoleReport` (rich progress bars and tables on stderr); the
`on_step` hook of `train()` is a `StepHook`. Every event is optional: subclass and override what you need.

Order of events in a run:
    on_message*  on_phase_start("xe")  (on_log | on_validation | on_step)*  on_phase_end("xe")
    [the same for "scst"]  on_end(result)      (on_end: only when the run ends normally, on rank 0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class TrainCallback:
    """Override the events you need; each default does nothing."""

    def on_message(self, text: str, warning: bool = False) -> None:
        """A line for the user: the run summary, "resuming ... at step k", a fallback that was taken."""

    def on_phase_start(self, phase: str, total: int, done: int) -> None:
        """A phase ("xe" or "scst") starts (or resumes) with `done` of its `total` optimiser steps done."""

    def on_log(self, record: dict[str, Any]) -> None:
        """A step record was written to metrics.jsonl (every log_every steps, at epoch ends and the last step);
        it has tokens_per_s, the rate since the previous one."""

    def on_validation(self, record: dict[str, Any], details: dict[str, Any]) -> None:
        """A validation: `record` as written to metrics.jsonl; `details` has seconds, patience_left and the
        first examples ({id, caption})."""

    def on_step(self, record: dict[str, Any]) -> None:
        """After every optimiser step (and its checkpoint, if one was due): phase, step, epoch, loss, lr,
        tokens (and reward in SCST). An exception raised here stops the run as a kill would."""

    def on_phase_end(self, phase: str) -> None:
        """A phase ended, normally or by an exception."""

    def on_end(self, result: Any) -> None:
        """The run ended normally: `result` is the TrainResult; result.json, metrics.jsonl and best/ are
        written (the point for plots and summaries of the whole run)."""


class Callbacks(TrainCallback):
    """Several callbacks called in order."""

    def __init__(self, callbacks: Sequence[TrainCallback] = ()):
        self.callbacks = list(callbacks)

    def on_message(self, text: str, warning: bool = False) -> None:
        for c in self.callbacks:
            c.on_message(text, warning)

    def on_phase_start(self, phase: str, total: int, done: int) -> None:
        for c in self.callbacks:
            c.on_phase_start(phase, total, done)

    def on_log(self, record: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_log(record)

    def on_validation(self, record: dict[str, Any], details: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_validation(record, details)

    def on_step(self, record: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_step(record)

    def on_phase_end(self, phase: str) -> None:
        for c in self.callbacks:
            c.on_phase_end(phase)

    def on_end(self, result: Any) -> None:
        for c in self.callbacks:
            c.on_end(result)


class StepHook(TrainCallback):
    """train(on_step=fn): fn(record) after every optimiser step."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]):
        self.fn = fn

    def on_step(self, record: dict[str, Any]) -> None:
        self.fn(record)
