"""The paper's per-word gate analysis: for each generated token, the mean linguistic and visual
SRAU gate values (averaged over decoder layers, encoder levels and channels), drawn as bars."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vgpt_cli.errors import ConfigError


def plot_gates(results: Sequence[Any], path: Path) -> Path:
    """One panel per captioned image: visual (and linguistic) gate per generated token. `results` are
    vgpt_cli.api.CaptionResult objects with `tokens` filled (caption(..., gates=True))."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--gates-plot needs matplotlib: `pip install matplotlib`") from None
    path = Path(path)
    rows = [r for r in results if r.tokens]
    if not rows:
        raise ConfigError("--gates-plot: no gate values to draw (the model has no SRAU gates: gating='none')")
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(6.0, 0.55 * max(len(r.tokens) for r in rows)),
                                                        2.6 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        x = range(len(r.tokens))
        ax.bar([i - 0.2 for i in x], [t["visual"] for t in r.tokens], width=0.4, label="visual", color="#d95f02")
        ax.bar([i + 0.2 for i in x], [t["linguistic"] for t in r.tokens], width=0.4, label="linguistic",
               color="#1b9e77")
        ax.set_xticks(list(x), [t["token"] for t in r.tokens], rotation=45, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean gate")
        ax.set_title(f"{Path(r.source).name}: {r.caption}", fontsize=9, loc="left")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
