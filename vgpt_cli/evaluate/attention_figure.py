"""The "show, attend and tell" figure: one panel per word of a caption, that word's cross-attention map
over the image as the backbone saw it (after its resize and centre crop, which is what the token grid
covers). Drawn with PIL only, so `vgpt caption --attention` needs no plotting extra."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

COLUMNS = 5
LABEL_H = 16
TITLE_H = 20
GAP = 4
ALPHA = 0.55  # heat over image
# a perceptually ordered dark-to-bright ramp (close to matplotlib's "inferno"), interpolated linearly
_RAMP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64)


def colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + (3,))."""
    pos = np.clip(x, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.minimum(np.floor(pos).astype(int), len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    return np.round(_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def word_groups(tokens: Sequence[str], caption: str) -> list[tuple[str, list[int]]]:
    """Group the generated tokens (their text, as CaptionResult.tokens holds it, stripped) into the
    caption's words: [(word, token indices)]. A final "<eos>" is left out. When the tokens do not spell
    the caption's words (e.g. a character split over two byte-level tokens), one group per token."""
    toks = list(tokens)
    if toks and toks[-1] == "<eos>":
        toks = toks[:-1]
    groups: list[tuple[str, list[int]]] = []
    i = 0
    for word in caption.split():
        acc, idx = "", []
        while i < len(toks) and len(acc) < len(word):
            acc += toks[i]
            idx.append(i)
            i += 1
        if acc != word:
            return [(t, [k]) for k, t in enumerate(toks)]
        groups.append((word, idx))
    return groups if i == len(toks) else [(t, [k]) for k, t in enumerate(toks)]


def upsample(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(H, W) map -> (height, width) float array in [0, 1]: bilinear, then stretched from the map's own
    minimum to its maximum (a peak shows even on a nearly flat map; a flat map shows as all dark)."""
    up = F.interpolate(grid[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    lo, hi = float(up.min()), float(up.max())
    return ((up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)).numpy()


def overlay(view: Image.Image, grid: torch.Tensor) -> Image.Image:
    """The heatmap of one (H, W) map blended over `view`."""
    heat = colormap(upsample(grid, (view.height, view.width)))
    base = np.asarray(view.convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.round((1 - ALPHA) * base + ALPHA * heat).astype(np.uint8))


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def draw_figure(view: Image.Image, words: Sequence[tuple[str, torch.Tensor]], title: str = ""
                ) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """The figure for one image: `view` the image as the backbone saw it, `words` [(word, (H, W) map)].
    Returns the image and each word panel's heatmap box (x0, y0, x1, y1), in order."""
    w, h = view.size
    n = max(len(words), 1)
    cols = min(COLUMNS, n)
    rows = math.ceil(n / cols)
    cell_w, cell_h = w + GAP, h + LABEL_H + GAP
    fig = Image.new("RGB", (cols * cell_w + GAP, TITLE_H + rows * cell_h + GAP), "white")
    draw = ImageDraw.Draw(fig)
    font = ImageFont.load_default()
    draw.text((GAP, 4), _fit(draw, title, font, fig.width - 2 * GAP), fill="black", font=font)
    boxes = []
    for k, (word, grid) in enumerate(words):
        r, c = divmod(k, cols)
        x0, y0 = GAP + c * cell_w, TITLE_H + r * cell_h
        draw.text((x0, y0 + 2), _fit(draw, word, font, w), fill="black", font=font)
        fig.paste(overlay(view, grid), (x0, y0 + LABEL_H))
        boxes.append((x0, y0 + LABEL_H, x0 + w, y0 + LABEL_H + h))
    return fig, boxes


def word_maps(tokens: Sequence[str], caption: str, maps: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """[(word, its (H, W) map)]: the mean of the maps of the word's tokens."""
    return [(word, maps[idx].mean(dim=0)) for word, idx in word_groups(tokens, caption)]


def save_figure(fig: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG atomically (a temporary name in the same folder, then a rename)."""
    from vgpt_cli.files import atomic_write

    return atomic_write(Path(path), lambda tmp: fig.save(tmp, format="PNG"))


def figure_names(sources: Sequence[str]) -> list[str]:
    """One distinct file name per image: <stem>.attention.png, then <stem>-2.attention.png ... when taken."""
    used: set[str] = set()
    out = []
    for s in sources:
        stem = Path(s).stem or "image"
        name, k = f"{stem}.attention.png", 1
        while name in used:
            k += 1
            name = f"{stem}-{k}.attention.png"
        used.add(name)
        out.append(name)
    return out


def check_grid(backbone) -> None:
    """ConfigError when the backbone's tokens are not a square grid (before any image is captioned)."""
    from vgpt_cli.attention import grid_shape
    from vgpt_cli.errors import ConfigError

    n = backbone.meta.get("tokens_per_image")
    if n is None:
        return
    try:
        grid_shape(int(n))
    except ValueError as e:
        raise ConfigError(f"--attention: backbone {backbone.name!r}: {e}") from None


def write_figures(captioner, results: Sequence, out_dir: str | os.PathLike) -> list[Path]:
    """One figure per captioned image in `results` (CaptionResult from caption(..., attention=True),
    from image files), written to out_dir; returns the paths. The image is shown as the backbone saw it
    (captioner.backbone's resize and crop), which is what the token grid covers."""
    from vgpt_cli.features import open_rgb

    done = [r for r in results if r.ok and r.attention is not None]
    paths = []
    for r, name in zip(done, figure_names([r.source for r in done])):
        pixels = captioner.backbone.preprocess(open_rgb(r.source))          # (3, H, W) uint8
        view = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        words = word_maps([t["token"] for t in r.tokens], r.caption or "", r.attention)
        fig, _ = draw_figure(view, words, title=f"{Path(r.source).name}: {r.caption}")
        paths.append(save_figure(fig, Path(out_dir) / name))
    return paths
