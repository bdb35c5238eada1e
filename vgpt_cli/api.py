"""The notebook API: load a trained model folder and caption images in two lines.

    from vgpt_cli.api import load_captioner
    cap = load_captioner("runs/r1/best")
    cap(["a.jpg", "b.png"])            # -> ["a dog on a couch", ...]

The images go through the backbone the model was trained on (its record is saved with the model as
preprocessor.json; failing that, the workspace's feature store record), with exactly the decoding and
preprocessing that `vgpt extract-features` used, then through beam search. `vgpt caption` is this
same code with a command line around it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from vgpt_cli.errors import DataError, ModelLoadError, VgptError
from vgpt_cli.workspace import Workspace

if TYPE_CHECKING:
    from torch import Tensor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class CaptionResult:
    """The caption of one image, or why there is none."""

    source: str                       # the file path, or "<PIL image #i>"
    caption: str | None = None
    score: float | None = None        # beam score: summed token log-probabilities
    error: str | None = None
    tokens: list[dict[str, Any]] | None = None  # with gates: [{"token", "linguistic", "visual"}, ...]
    beams: list[dict[str, Any]] | None = None   # with beams: [{"caption", "score"}, ...], best first
    attention: Any = None             # with attention: (tokens, H, W) float tensor, one map per token
    cut: bool = False                 # the caption reached the token limit without ending (max_length)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"image": self.source, "caption": self.caption}
        if self.caption is not None:
            d["cut"] = self.cut
        if self.score is not None:
            d["score"] = self.score
        if self.error is not None:
            d["error"] = self.error
        if self.tokens is not None:
            d["tokens"] = self.tokens
        if self.beams is not None:
            d["beams"] = self.beams
        return d


def expand_image_paths(args: Sequence[str | os.PathLike]) -> tuple[list[str], list[CaptionResult]]:
    """Files, folders (their image files, sorted, not recursive) and globs -> image paths, plus a
    failed result for each argument that names nothing."""
    paths: list[str] = []
    missing: list[CaptionResult] = []
    for arg in args:
        s = str(arg)
        p = Path(s).expanduser()
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                missing.append(CaptionResult(s, error="folder holds no image files"))
            paths += found
        elif p.is_file():
            paths.append(str(p))
        elif glob.has_magic(s):
            found = sorted(f for f in glob.glob(os.path.expanduser(s), recursive=True) if Path(f).is_file())
            if not found:
                missing.append(CaptionResult(s, error="the pattern matches no file"))
            paths += found
        else:
            missing.append(CaptionResult(s, error="file not found"))
    return list(dict.fromkeys(paths)), missing


def _token_text(tokenizer, token_id: int, eos: int) -> str:
    if token_id == eos:
        return "<eos>"
    return tokenizer.decode([token_id]).strip() or repr(tokenizer.decode([token_id]))


class ImageCaptioner:
    """A trained captioner plus the backbone it was trained on. Call it on images."""

    def __init__(self, model, backbone, *, beam_size: int | None = None, max_length: int | None = None,
                 rerank: int | None = None, rerank_samples: int | None = None,
                 batch_size: int = 16, device: str = "cpu", model_dir: str = "") -> None:
        from vgpt_cli.model_folders import decode_options

        self.model, self.backbone, self.device, self.model_dir = model, backbone, device, model_dir
        # None: the decoding settings saved with the model (those it was validated and selected with)
        self.options = decode_options(model, beam_size=beam_size, max_length=max_length, rerank=rerank,
                                      rerank_samples=rerank_samples)
        self.batch_size = batch_size
        from vgpt_cli.model.artifact import require_compatible

        require_compatible(model, backbone.dim, backbone.fingerprint, f"{model_dir}: backbone {backbone.name!r}",
                           "the backbone record does not belong to this model")

    @property
    def notice(self) -> str | None:
        """One line for the user when the model's precision will not pay on this device (bf16 on a CPU
        without bf16 units), else None."""
        from vgpt_cli.model.precision import check_precision

        return check_precision(self.model.precision, self.device)

    @property
    def notes(self) -> list[str]:
        """Every line the user should read once: an older folder's layout, a precision that will not pay."""
        notice = self.notice
        return [*self.model.load_notes, *([notice] if notice else [])]

    def __call__(self, images: Sequence[str | os.PathLike | Image.Image] | str | os.PathLike | Image.Image
                 ) -> list[str]:
        """Captions of the images (paths or PIL images), in order. A bad image raises DataError."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        results = self.caption(images)
        bad = [r for r in results if not r.ok]
        if bad:
            raise DataError(f"{bad[0].source}: {bad[0].error}; give a readable JPEG/PNG image")
        return [r.caption or "" for r in results]

    def caption(self, images: Sequence[str | os.PathLike | Image.Image], *, gates: bool = False,
                beams: bool = False, attention: bool = False,
                progress: Callable[[int], None] | None = None) -> list[CaptionResult]:
        """One CaptionResult per image; unreadable images get an error instead of a caption.

        gates: each token with its mean linguistic and visual gate (`tokens`); beams: every finished
        beam with its score (`beams`); attention: each token's cross-attention map over the image's
        token grid (`attention`, vgpt_cli.attention.word_attention; and `tokens` even for a model
        without gates)."""
        from vgpt_cli.features import BadImage, open_rgb

        results: list[CaptionResult] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            pixels: list[Tensor] = []
            good: list[CaptionResult] = []
            for i, img in enumerate(chunk):
                if isinstance(img, Image.Image):
                    r = CaptionResult(f"<PIL image #{start + i}>")
                    pixels.append(self.backbone.pixels(img))
                    good.append(r)
                else:
                    r = CaptionResult(str(img))
                    try:
                        pixels.append(self.backbone.pixels(open_rgb(img)))
                        good.append(r)
                    except BadImage as e:
                        r.error = e.reason
                results.append(r)
            if pixels:
                self._caption_batch(pixels, good, gates=gates, beams=beams, attention=attention)
            if progress is not None:
                progress(len(chunk))
        return results

    def caption_pixels(self, pixels: Sequence[Tensor], *, gates: bool = False, beams: bool = False,
                       attention: bool = False) -> list[CaptionResult]:
        """caption() for images already made into the backbone's input (`self.backbone.pixels(image)`,
        which callers may run in other threads): one search per batch_size of them."""
        results = [CaptionResult(f"<pixels #{i}>") for i in range(len(pixels))]
        for start in range(0, len(pixels), self.batch_size):
            self._caption_batch(list(pixels[start:start + self.batch_size]), results[start:start + self.batch_size],
                                gates=gates, beams=beams, attention=attention)
        return results

    def caption_features(self, arrays: Sequence[Any], *, gates: bool = False, beams: bool = False,
                         attention: bool = False) -> list[CaptionResult]:
        """caption_pixels() for images whose backbone features are already computed
        (`self.backbone.features_for_pixels(pixels)`: (N, C) arrays): one search per batch_size of them."""
        results = [CaptionResult(f"<features #{i}>") for i in range(len(arrays))]
        for start in range(0, len(arrays), self.batch_size):
            self._search_batch(list(arrays[start:start + self.batch_size]), results[start:start + self.batch_size],
                               gates=gates, beams=beams, attention=attention)
        return results

    def _caption_batch(self, pixels: list[Tensor], results: list[CaptionResult], *, gates: bool, beams: bool,
                       attention: bool) -> None:
        """The backbone, then one batched (beam) search over all of `pixels`; fills `results` in place."""
        arrays = self.backbone.features_for_pixels(pixels, batch_size=self.batch_size)
        self._search_batch(arrays, results, gates=gates, beams=beams, attention=attention)

    def _search_batch(self, arrays: list[Any], results: list[CaptionResult], *, gates: bool, beams: bool,
                      attention: bool) -> None:
        """One batched (beam) search over the images' features; fills `results` in place."""
        import torch

        from vgpt_cli.decode import pad_features
        from vgpt_cli.decode.search import decode, decode_candidates

        f, lengths = pad_features(arrays, self.device)
        with torch.inference_mode():
            if beams and self.options.beam_size > 1:
                all_hyps = decode_candidates(self.model, f, lengths, self.options, return_gates=gates)
            else:
                all_hyps = [[h] for h in decode(self.model, f, lengths, self.options, return_gates=gates)]
        eos = self.model.eos_token_id
        for j, (r, hyps) in enumerate(zip(results, all_hyps)):
            h = hyps[0]
            r.caption, r.score, r.cut = h.text, h.score, not h.ended
            if beams:
                r.beams = [{"caption": b.text, "score": b.score} for b in hyps]
            if (gates and h.gates is not None) or attention:
                r.tokens = []
                for k, t in enumerate(h.token_ids):
                    d: dict[str, Any] = {"token": _token_text(self.model.tokenizer, t, eos)}
                    if h.gates is not None:
                        d["linguistic"], d["visual"] = round(h.gates[k][0], 4), round(h.gates[k][1], 4)
                    r.tokens.append(d)
            if attention:
                from vgpt_cli.attention import word_attention

                r.attention = word_attention(self.model, f[j, :int(lengths[j])], h.token_ids)


def resolve_backbone_meta(model: Any, model_dir: Path, workspace: Workspace | None) -> tuple[dict[str, Any], str]:
    """The backbone record of a model: the preprocessor.json saved with it, else (a folder saved without
    one) the workspace's feature store's, said in one of the model's load notes."""
    from vgpt_cli.model.artifact import OLD_BACKBONE_FILE, PREPROCESSOR_FILE, require_rebuildable

    if model.preprocessor:
        saved = model_dir / PREPROCESSOR_FILE
        saved = saved if saved.is_file() else model_dir / OLD_BACKBONE_FILE
        return require_rebuildable(model.preprocessor, str(saved)), str(saved)
    if workspace is not None:
        from vgpt_cli.features import open_workspace_store

        try:
            store = open_workspace_store(workspace)
        except VgptError as e:
            raise ModelLoadError(f"{model_dir}: no {PREPROCESSOR_FILE} beside the weights, and no feature store in "
                                 f"the workspace {workspace.root} ({e}); copy {PREPROCESSOR_FILE} from the training run "
                                 "or run in the workspace the model was trained in") from None
        model.load_notes.append(f"{model_dir}: no {PREPROCESSOR_FILE}; images are prepared as the feature store of "
                                f"{workspace.root} says ({store.meta.get('backbone')})")
        return store.meta, f"{store.path} (workspace feature store)"
    raise ModelLoadError(f"{model_dir}: no {PREPROCESSOR_FILE} beside the weights; copy it from the training run "
                         "folder, or pass the workspace the model was trained in")


def load_captioner(model_dir: str | os.PathLike, *, workspace: str | os.PathLike | Workspace | None = None,
                   device: str | None = None, beam_size: int | None = None, max_length: int | None = None,
                   rerank: int | None = None, rerank_samples: int | None = None,
                   batch_size: int = 16, precision: str = "fp32") -> ImageCaptioner:
    """Load a trained model folder (runs/<run>/best, or any Captioner.save_pretrained folder with its
    preprocessor.json) and its backbone; returns a callable: captioner(["a.jpg", pil_image]) -> captions.

    Without preprocessor.json in the folder, the backbone record of `workspace`'s feature store is used
    (default: $VGPT_WORKSPACE or the current folder). beam_size, max_length, rerank and rerank_samples default to the
    decoding settings saved with the model (its generation_config.json); device to
    vgpt_cli.device.resolve_device's choice (CUDA, then MPS, then the CPU). precision: fp32 (as saved),
    bf16 or int8 (vgpt_cli.model.precision: narrowed at load time; `notice` says when it will not pay)."""
    from vgpt_cli.device import resolve_device
    from vgpt_cli.features import load_backbone_from_meta
    from vgpt_cli.model.precision import check_precision, narrow_model
    from vgpt_cli.model_folders import load_model

    mdir = Path(model_dir).expanduser().resolve()
    # no workspace given: the one of $VGPT_WORKSPACE or the current folder, for its feature store record
    ws = workspace if isinstance(workspace, Workspace) else Workspace.from_option(
        Path(workspace) if workspace is not None else None)
    dev = resolve_device(device)
    check_precision(precision, dev)  # refused before the (slow) load
    model = narrow_model(load_model(mdir, dev), precision)
    meta, _ = resolve_backbone_meta(model, mdir, ws)
    backbone = load_backbone_from_meta(meta, device=dev)
    return ImageCaptioner(model, backbone, beam_size=beam_size, max_length=max_length, rerank=rerank,
                          rerank_samples=rerank_samples, batch_size=batch_size, device=dev, model_dir=str(mdir))
