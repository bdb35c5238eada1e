"""Training curves from a run's metrics.jsonl: curves.png at the end of every run, and TensorBoard event files
(`vgpt train --tensorboard`, what transformers' Trainer writes with report_to="tensorboard").

metrics.jsonl is the one record of a run (its steps' loss, learning rate, tokens/s, mean visual gate,
and its validations); both outputs are drawn from it, so they agree with it and with each other, and a
resumed run (whose metrics.jsonl is cut back to the checkpoint) is drawn without the steps it repeats.

Steps are counted over the whole run: SCST steps continue after the last cross-entropy step.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
METRICS_FILE = "metrics.jsonl"
# record key -> TensorBoard tag (HF Trainer's train/ and eval/ prefixes)
STEP_TAGS = {"loss": "train/loss", "lr": "train/learning_rate", "tokens_per_s": "train/tokens_per_s",
             "visual_gate": "train/visual_gate", "reward": "train/reward"}
EVAL_TAG = "eval/cider"


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut short by a kill (the last one) is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return parse_records(text)


def parse_records(text: str) -> list[dict[str, Any]]:
    """The JSON objects of metrics.jsonl lines; lines that are not one (cut short) are skipped."""
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class StepCounter:
    """Run-wide step of a record: cross-entropy steps as logged, SCST steps after the last of them."""

    def __init__(self) -> None:
        self.xe_last = 0

    def __call__(self, rec: dict[str, Any]) -> int | None:
        step = rec.get("step")
        if not isinstance(step, int):
            return None
        if rec.get("phase") == "scst":
            return self.xe_last + step
        self.xe_last = max(self.xe_last, step)
        return step


def scalars(records: Iterable[dict[str, Any]], counter: StepCounter | None = None
            ) -> list[tuple[str, int, float]]:
    """(tag, run-wide step, value) of every number the records hold, in order."""
    counter = counter or StepCounter()
    out = []
    for rec in records:
        event = rec.get("event")
        if event not in (None, "validation"):
            continue  # resume markers
        step = counter(rec)
        if step is None:
            continue
        if event == "validation":
            if isinstance(rec.get("cider"), (int, float)):
                out.append((EVAL_TAG, step, float(rec["cider"])))
            continue
        for key, tag in STEP_TAGS.items():
            value = rec.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append((tag, step, float(value)))
    return out


def series(records: Iterable[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """{tag: (steps, values)} of scalars(records)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for tag, step, value in scalars(records):
        xs, ys = out.setdefault(tag, ([], []))
        xs.append(step)
        ys.append(value)
    return out


def write_curves(run_dir: str | os.PathLike) -> Path | None:
    """run_dir/curves.png: loss, validation CIDEr-D and mean visual gate against the step, from
    metrics.jsonl (atomically). None, writing nothing, without matplotlib (the plot extra) or records."""
    run_dir = Path(run_dir)
    records = read_records(run_dir / METRICS_FILE)
    s = series(records)
    if not s:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    scst_from = first_step_of(records, "scst")
    fig, axes = plt.subplots(3, 1, figsize=(7.0, 7.5), sharex=True)
    panels = [("train/loss", "loss (cross-entropy; SCST: policy loss)", "#1b9e77"),
              (EVAL_TAG, "validation CIDEr-D", "#d95f02"),
              ("train/visual_gate", "mean visual gate", "#7570b3")]
    for ax, (tag, label, colour) in zip(axes, panels):
        if tag in s:
            xs, ys = s[tag]
            ax.plot(xs, ys, color=colour, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.2)
        else:
            ax.text(0.5, 0.5, "not logged" + (" (no validation split)" if tag == EVAL_TAG else ""),
                    ha="center", va="center", transform=ax.transAxes, color="grey")
        if tag == "train/visual_gate":
            ax.set_ylim(-0.03, 1.03)  # a gate cut to 0 by tau stays visible above the axis
        if scst_from is not None:
            ax.axvline(scst_from, color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("step" + (" (SCST from the dotted line)" if scst_from is not None else ""))
    axes[0].set_title(run_dir.name, fontsize=9, loc="left")
    fig.tight_layout()
    from vgpt_cli.files import atomic_write

    try:
        return atomic_write(run_dir / CURVES_FILE, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def first_step_of(records: Iterable[dict[str, Any]], phase: str) -> int | None:
    """The run-wide step of the first step record of `phase`, or None."""
    counter = StepCounter()
    for rec in records:
        if rec.get("event") is None and (step := counter(rec)) is not None and rec.get("phase") == phase:
            return step
    return None


def finish_run(run_dir: str | os.PathLike, say: Callable[[str], None] = lambda s: None) -> None:
    """The end-of-run hook of train(): curves.png, however the run ended. Never raises (it runs while an
    error of the run itself may be on its way out)."""
    try:
        if write_curves(run_dir) is None and (Path(run_dir) / METRICS_FILE).is_file():
            import importlib.util

            if importlib.util.find_spec("matplotlib") is None:
                say("no curves.png: it needs matplotlib (pip install 'vgpt[plot]')")
    except Exception as e:  # noqa: BLE001 - a plot must never turn a finished run into a failed one
        say(f"curves.png not written: {type(e).__name__}: {e}")


class TensorBoardMirror:
    """TensorBoard event files in run_dir/tensorboard/ that follow metrics.jsonl: `sync()` writes what was
    appended since the last call (call it after each step for live curves, and once at the end). When the
    file got shorter (a resume cut it back to its checkpoint), the events are written again from the start,
    so TensorBoard never shows a step twice."""

    def __init__(self, run_dir: str | os.PathLike):
        from vgpt_cli.errors import ConfigError

        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'vgpt[tensorboard]' "
                              "(or pip install tensorboard)") from None
        self._writer_cls = SummaryWriter
        self.run_dir = Path(run_dir)
        self.log_dir = self.run_dir / TENSORBOARD_DIR
        self.writer: Any = None
        self.offset = 0
        self.counter = StepCounter()

    def _open(self) -> None:
        # a new writer over no old events: made lazily, once metrics.jsonl exists (train() checks first)
        if self.writer is not None:
            self.writer.close()
        shutil.rmtree(self.log_dir, ignore_errors=True)
        self.writer = self._writer_cls(log_dir=str(self.log_dir))
        self.offset, self.counter = 0, StepCounter()

    def sync(self) -> int:
        """Write the complete new records; returns how many scalars were written."""
        path = self.run_dir / METRICS_FILE
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return 0
        if self.writer is None or size < self.offset:
            self._open()
        if size == self.offset:
            return 0
        with open(path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1  # only whole lines: the writer may be mid-line
        if end == 0:
            return 0
        self.offset += end
        records = parse_records(chunk[:end].decode("utf-8", errors="replace"))
        items = scalars(records, self.counter)
        for tag, step, value in items:
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        return len(items)

    def close(self) -> None:
        if self.writer is not None:
            self.sync()
            self.writer.close()
            self.writer = None
