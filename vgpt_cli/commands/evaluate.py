"""`vgpt evaluate`: score a split with a trained model, or score existing prediction files."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vgpt_cli.commands import options as opt
from vgpt_cli.commands.common import (
    decode_progress,
    err,
    friendly_errors,
    print_json,
    print_table,
    say,
    workspace,
)
from vgpt_cli.errors import ConfigError
from vgpt_cli.evaluate.metrics import METRICS, compute_metrics_many, load_predictions, load_references
from vgpt_cli.files import atomic_write_json


class Split(str, Enum):
    val = "val"
    test = "test"


def metrics_table(rows: dict[str, dict[str, float]], title: str | None = None, extra: list[str] = ()) -> Table:
    """One row per scored set, one column per metric that any row has (4 decimals, as papers print)."""
    cols = [m for m in (*METRICS, *extra) if any(m in r for r in rows.values())]
    table = Table(title=title, title_justify="left")
    table.add_column("", overflow="fold")
    for c in cols:
        table.add_column(c, justify="right", no_wrap=True)
    for name, r in rows.items():
        table.add_row(name, *(f"{r[c]:.4f}" if c in r else "-" for c in cols))
    return table


@friendly_errors
def command(
    ctx: typer.Context,
    split: Annotated[Split, typer.Option("--split", help="Which split of the workspace dataset to evaluate.")] = Split.test,
    model: opt.ModelDir = None,
    predictions: Annotated[list[Path] | None, typer.Option(
        "--predictions", "-p", help="Score this results file instead of decoding (COCO results "
        "[{\"image_id\", \"caption\"}] or {\"id\": \"caption\"}); repeat to score several in one table.")] = None,
    references: Annotated[Path | None, typer.Option(
        "--references", "-r", help="Ground truth from this file (COCO annotation format or "
        "{\"id\": [\"ref\", ...]}) instead of the workspace's split.")] = None,
    beam_size: opt.BeamSize = None,
    max_length: opt.MaxLength = None,
    rerank: opt.Rerank = None,
    rerank_samples: opt.RerankSamples = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images decoded together.")] = 32,
    device: opt.Device = None,
    precision: opt.Precision = "fp32",
    compare_fp32: Annotated[bool, typer.Option("--compare-fp32", help=(
        "With --precision fp16, int8 or bf16: also decode at fp32 and report the share of identical captions, "
        "both scores and the worst disagreement."))] = False,
    spice: Annotated[bool, typer.Option("--spice/--no-spice", help="Try SPICE (needs Stanford CoreNLP jars).")] = True,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="With --predictions: also write the metrics JSON here.")] = None,
    allow_partial: Annotated[bool, typer.Option(
        "--allow-partial", help="With --predictions: score a file that covers only some of the reference "
        "images (over those images; the coverage is printed either way).")] = False,
    as_json: opt.Json = False,
) -> None:
    """Decode a split with the best model and score it (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE when
    available), or score existing prediction files.

    Example:

        vgpt evaluate --split test

        vgpt evaluate --split val --model runs/r1/best --beam-size 3

        vgpt evaluate --split val --precision int8 --compare-fp32

        vgpt evaluate --predictions preds.json --references captions_val2014.json
    """
    if predictions:
        _score_files(ctx, predictions, references, split.value, spice, output, as_json, allow_partial)
        return
    if references is not None or output is not None:
        raise ConfigError("--references and --output go with --predictions; to evaluate a split, drop them")
    from vgpt_cli.evaluate.report import evaluate_split

    with decode_progress() as progress:
        result = evaluate_split(workspace(ctx), split.value, model_dir=model, beam_size=beam_size,
                                max_length=max_length, rerank=rerank, rerank_samples=rerank_samples, batch_size=batch_size, device=device, spice=spice,
                                precision=precision, compare_fp32=compare_fp32, log=say, progress=progress)
    if as_json:
        print_json(result.to_dict())
    else:
        extra = [k for k in ("grounded", "object_f1", "shape_f1") if k in result.scores]
        table = metrics_table({f"{result.dataset}/{result.split}": result.scores},
                              title=f"{result.model_dir}: {result.n_items} items, beam {result.decode['beam_size']}, "
                                    f"{result.precision}", extra=extra)
        if result.notes:
            table.caption = "; ".join(result.notes)
        print_table(table)
        if result.agreement is not None:
            print_table(agreement_table(result.agreement))
    err.print(f"wrote {result.metrics_path}, {result.predictions_path.name} and {result.per_image_path.name} "
              f"({result.seconds:.1f} s)", highlight=False)
    err.print("next: `vgpt caption IMAGE...` captions new images with this model", highlight=False)


def agreement_table(a: dict) -> Table:
    """--compare-fp32: the scores at both precisions, the share of identical captions, the worst case."""
    p = a["precision"]
    table = metrics_table({p: a["scores"][p], "fp32": a["scores"]["fp32"]},
                          title=f"{p} against fp32: {a['identical']:.1%} of {a['images']} captions identical",
                          extra=["object_f1"])
    if a["worst"] is not None:
        w = a["worst"]
        table.caption = (f"largest CIDEr drop: {w['image_id']}: {p} {w[p]!r} ({w['CIDEr']:.3f}) / "
                         f"fp32 {w['fp32']!r} ({w['CIDEr_fp32']:.3f})")
    return table


def _score_files(ctx: typer.Context, files: list[Path], references: Path | None, split: str, spice: bool,
                 output: Path | None, as_json: bool, allow_partial: bool = False) -> None:
    if output is not None and (output.is_dir() or output.parent.is_file()):
        raise ConfigError(f"--output {output}: {'a folder' if output.is_dir() else 'inside a file'}; give a "
                          "file name for the metrics JSON, e.g. -o metrics.json")
    notes: list[str] = []
    if references is not None:
        refs = load_references(references)
        ref_name = str(references)
    else:
        from vgpt_cli.evaluate.report import split_notes, workspace_manifest, workspace_references

        refs, ref_name = workspace_references(workspace(ctx), split)
        notes = split_notes(workspace_manifest(workspace(ctx)), split)
        for n in notes:
            err.print(f"[yellow]note:[/] {n}", highlight=False)
    # short row names: the file names, unless two files share one
    names = [f.name for f in files] if len({f.name for f in files}) == len(files) else [str(f) for f in files]
    sets = {n: load_predictions(f, refs) for n, f in zip(names, files)}
    partial = []
    for name, preds in sets.items():
        covered = sum(1 for k in preds if k in refs)
        err.print(f"{name}: covers {covered:,} of the {len(refs):,} images of {ref_name}", highlight=False)
        if covered < len(refs):
            partial.append(f"{name} ({covered:,} of {len(refs):,})")
    if partial and not allow_partial:
        raise ConfigError(f"{', '.join(partial)}: predictions for only some of the images of {ref_name}; "
                          "predict the rest, or pass --allow-partial to score over the predicted images only")
    if partial:
        notes = [*notes, f"--allow-partial: scored over the predicted images only: {', '.join(partial)}"]
        err.print(f"[yellow]note:[/] {notes[-1]}", highlight=False)
    reports = compute_metrics_many(sets, refs, spice=spice, log=say)
    payload = {name: {"references": ref_name, **r.to_dict(), "notes": notes} for name, r in reports.items()}
    if output is not None:
        atomic_write_json(output, payload)
    if as_json:
        print_json(payload)
    else:
        table = metrics_table({n: r.scores for n, r in reports.items()}, title=f"references: {ref_name}")
        if notes:
            table.caption = "; ".join(notes)
        print_table(table)
    if output is not None:
        err.print(f"wrote {output}", highlight=False)
