"""Evaluation of a workspace split: references from the manifest, decoding the cached features with a
trained model, metrics, and the files written into the run folder.

    runs/<run>/eval/<split>/predictions.json   COCO results format [{"image_id", "caption"}]
    runs/<run>/eval/<split>/per_image.jsonl    one line per item: caption, references, per-item scores
    runs/<run>/eval/<split>/metrics.json       corpus scores, what was skipped, decoding options, notes
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vgpt_cli.data.manifest import Manifest
from vgpt_cli.device import resolve_device
from vgpt_cli.errors import ConfigError, DataError
from vgpt_cli.evaluate.grounding import grid_preprocess, shapes_attention
from vgpt_cli.evaluate.metrics import coco_results, compute_metrics
from vgpt_cli.files import atomic_write_json, atomic_write_text
from vgpt_cli.model.artifact import require_compatible
from vgpt_cli.model_folders import decode_options, load_model, output_dir, resolve_model_dir
from vgpt_cli.workspace import Workspace


def workspace_manifest(ws: Workspace) -> Manifest:
    name = ws.current("dataset", "dataset", "vgpt prepare ...")
    return Manifest.load(ws.manifest_path(name))


def workspace_references(ws: Workspace, split: str) -> tuple[dict[str, list[str]], str]:
    """{id: [reference captions]} of `split` of the workspace's current dataset, and a name for it."""
    manifest = workspace_manifest(ws)
    refs = {item.id: list(item.captions) for item in manifest.items(split) if item.captions}
    return refs, f"{manifest.dataset}/{split} ({Path(ws.manifest_path(manifest.dataset))})"


def split_notes(manifest: Manifest, split: str) -> list[str]:
    """What every output about `split` must say (a cut test split above all)."""
    notes = []
    if split == "test" and manifest.sampling.get("test_cut"):
        full = manifest.sampling.get("test_full_images")
        notes.append(f"TEST SPLIT CUT: {len(manifest.items('test'))} of its {full} images (prepare --test-size); "
                     "scores are not comparable with the full test split")
    notes += [n for n in manifest.notes if split in n.lower() and "TEST SPLIT CUT" not in n]
    return notes


@dataclass
class SplitEvaluation:
    dataset: str
    split: str
    model_dir: str
    n_items: int
    scores: dict[str, float]
    skipped: dict[str, str]
    tokenizer: str
    decode: dict[str, Any]
    notes: list[str]
    out_dir: str
    seconds: float
    warnings: list[str] = field(default_factory=list)
    precision: str = "fp32"
    agreement: dict[str, Any] | None = None  # with compare_fp32: vgpt_cli.evaluate.agreement
    # on scenes that record their objects: where the words that name them look (evaluate/grounding.py)
    attention: dict[str, Any] | None = None

    @property
    def metrics_path(self) -> Path:
        return Path(self.out_dir) / "metrics.json"

    @property
    def predictions_path(self) -> Path:
        return Path(self.out_dir) / "predictions.json"

    @property
    def per_image_path(self) -> Path:
        return Path(self.out_dir) / "per_image.jsonl"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(metrics=str(self.metrics_path), predictions=str(self.predictions_path),
                 per_image=str(self.per_image_path))
        return d


def score_items(preds: dict[str, str], items: list, dataset_format: str, *, spice: bool,
                log: Callable[[str], None]) -> tuple[Any, dict[str, float]]:
    """The metrics of {id: caption} against the items' references, plus on shapes the grounded
    scores against each scene's recorded objects: (the metric report, all scores)."""
    report = compute_metrics(preds, {it.id: list(it.captions) for it in items}, spice=spice, log=log)
    scores = dict(report.scores)
    if dataset_format == "shapes" and all("objects" in it.extra for it in items):
        from vgpt_cli.data.shapes import object_scores

        scores.update(object_scores(preds, {it.id: it.extra["objects"] for it in items}))
    return report, scores


def evaluate_split(ws: Workspace, split: str, *, model_dir: Path | None = None, beam_size: int | None = None,
                   max_length: int | None = None, rerank: int | None = None, rerank_samples: int | None = None,
                   batch_size: int = 32, device: str | None = None, spice: bool = True,
                   precision: str = "fp32", compare_fp32: bool = False, log: Callable[[str], None] = print,
                   progress: Callable[[int, int], Callable[[int], None]] | None = None) -> SplitEvaluation:
    """Decode `split` of the workspace's dataset from its cached features and score it.

    beam_size, max_length, rerank, rerank_samples: None decodes with the model's saved generation settings (vgpt_cli.model_folders.decode_options).
    The outputs go to the run folder when the model is a checkpoint of this workspace's runs/, else
    to runs/external/<name>-<hash>/: nothing is written outside the workspace.
    precision: the weights' precision (vgpt_cli.model.precision); compare_fp32: also decode at fp32 and
    report how far the captions moved (`agreement`).
    progress(total, ...) -> advance(n) is called once with the item count (for a progress bar)."""
    import torch

    from vgpt_cli.decode import cut_note, decode_arrays
    from vgpt_cli.features import open_workspace_store
    from vgpt_cli.model.precision import check_precision, narrow_model

    if compare_fp32 and precision == "fp32":
        raise ConfigError("--compare-fp32 compares a narrower --precision with fp32: add --precision fp16, int8 or bf16")
    t0 = time.perf_counter()
    manifest = workspace_manifest(ws)
    items = [it for it in manifest.items(split) if it.captions]
    if not items:
        raise DataError(f"{ws.manifest_path(manifest.dataset)}: split {split!r} has no captioned items to evaluate; "
                        "prepare the dataset with a val/test split")
    notes = split_notes(manifest, split)
    for n in notes:
        log(f"note: {n}")  # first thing, before the long decode; also in the table and metrics.json
    mdir = resolve_model_dir(ws, model_dir)
    store = open_workspace_store(ws)
    ids = [it.id for it in items]
    store.require(ids)
    dev = resolve_device(device)
    notice = check_precision(precision, dev)
    if notice:
        log(f"note: {notice}")
    model = load_model(mdir, dev)  # fp32, narrowed below (after the fp32 captions when comparing)
    for n in model.load_notes:
        log(f"note: {n}")
    require_compatible(model, store.dim, store.fingerprint, f"the workspace's feature store {store.path.name}",
                       f"run `vgpt extract-features` with the model's backbone first, or evaluate in the workspace "
                       f"it was trained in ({mdir})")
    opts = decode_options(model, beam_size=beam_size, max_length=max_length, rerank=rerank,
                          rerank_samples=rerank_samples)
    advance = progress(len(ids) * (2 if compare_fp32 else 1)) if progress else None
    arrays = [store.get(i) for i in ids]

    def captions() -> list:
        with torch.inference_mode():
            return decode_arrays(model, arrays, opts, batch_size=batch_size, device=dev, progress=advance)

    hyps_fp32 = captions() if compare_fp32 else None
    narrow_model(model, precision)
    hyps = captions()
    cut = cut_note(sum(not h.ended for h in hyps), len(hyps), opts.max_length)  # scored as they are, said so
    if cut:
        log(f"note: {cut}")
        notes = [*notes, cut]
    preds = {i: h.text for i, h in zip(ids, hyps)}
    report, scores = score_items(preds, items, manifest.format, spice=spice, log=log)
    agreement = None
    if hyps_fp32 is not None:
        from vgpt_cli.evaluate.agreement import precision_agreement

        preds_fp32 = {i: h.text for i, h in zip(ids, hyps_fp32)}
        report_fp32, scores_fp32 = score_items(preds_fp32, items, manifest.format, spice=spice, log=log)
        agreement = precision_agreement(precision, preds, preds_fp32, scores, scores_fp32, report.per_item,
                                        report_fp32.per_item)

    attention = None
    preprocess = grid_preprocess(store.meta)
    if preprocess is not None and all(it.extra.get("objects") for it in items):
        attention = shapes_attention(model, preprocess, store, items, preds)
        scores.update({k: attention[k] for k in ("attention_peak_in_object", "attention_peak_chance")
                       if attention.get(k) is not None})

    # narrower weights write beside the fp32 evaluation, never over it
    out_dir = output_dir(ws, mdir) / "eval" / (split if precision == "fp32" else f"{split}-{precision}")
    result = SplitEvaluation(
        dataset=manifest.dataset, split=split, model_dir=str(mdir), n_items=len(ids), scores=scores,
        skipped=report.skipped, tokenizer=report.tokenizer, decode=asdict(opts), notes=notes, out_dir=str(out_dir),
        seconds=round(time.perf_counter() - t0, 3), warnings=report.warnings, precision=precision,
        agreement=agreement, attention=attention)
    atomic_write_json(result.predictions_path, coco_results(preds))
    lines = []
    for it, h in zip(items, hyps):
        lines.append(json.dumps({"image_id": it.id, "caption": h.text, "references": it.captions,
                                 "images": it.images, "beam_score": h.score, "ended": h.ended,
                                 "scores": report.per_item[it.id]}, ensure_ascii=False))
    atomic_write_text(result.per_image_path, "\n".join(lines) + "\n")
    atomic_write_json(result.metrics_path, result.to_dict())
    return result
