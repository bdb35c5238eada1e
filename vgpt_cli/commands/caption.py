"""`vgpt caption`: caption image files with a trained model. Parsing and printing only."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vgpt_cli.commands import options as opt
from vgpt_cli.commands.common import decode_progress, err, friendly_errors, print_json, print_table, workspace
from vgpt_cli.errors import ConfigError, DataError, PartialRunError


@friendly_errors
def command(
    ctx: typer.Context,
    images: Annotated[list[str], typer.Argument(
        help="Image files, folders (their images) and globs such as 'photos/*.jpg'.", show_default=False)],
    model: opt.ModelDir = None,
    beam_size: opt.BeamSize = None,
    max_length: opt.MaxLength = None,
    rerank: opt.Rerank = None,
    rerank_samples: opt.RerankSamples = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")] = 16,
    device: opt.Device = None,
    precision: opt.Precision = "fp32",
    gates: Annotated[bool, typer.Option(
        "--gates", help="Show each generated token with its mean linguistic and visual SRAU gate.")] = False,
    gates_plot: Annotated[Path | None, typer.Option(
        "--gates-plot", help="Draw the per-token gates into this PNG file (needs matplotlib).")] = None,
    attention: Annotated[Path | None, typer.Option(
        "--attention", file_okay=False, help="Write one PNG per image into this folder: a panel per word "
        "with its cross-attention heatmap over the image.")] = None,
    as_json: opt.Json = False,
    as_jsonl: Annotated[bool, typer.Option("--jsonl", help="Print one JSON object per image per line.")] = False,
) -> None:
    """Caption images with the workspace's best model (or --model DIR).

    The images go through the same decoding, preprocessing and backbone as feature extraction did
    for training. Unreadable images are reported and skipped; the exit code is then 3 (partial).

    Example:

        vgpt caption photo.jpg

        vgpt caption holiday/ 'more/*.png' --model runs/r1/best --json

        vgpt caption cat.jpg --gates --gates-plot gates.png

        vgpt caption cat.jpg --attention attention/

        vgpt caption photos/ --precision int8
    """
    from vgpt_cli.api import expand_image_paths, load_captioner
    from vgpt_cli.decode import cut_note
    from vgpt_cli.model_folders import resolve_model_dir

    if as_json and as_jsonl:
        raise ConfigError("--json and --jsonl: choose one")
    ws = workspace(ctx)
    model_dir = resolve_model_dir(ws, model)
    paths, missing = expand_image_paths(images)
    if not paths:
        raise DataError(f"{missing[0].source}: {missing[0].error}; give image files, folders or globs")
    err.print(f"loading {model_dir} ...", highlight=False)
    captioner = load_captioner(model_dir, workspace=ws, device=device, beam_size=beam_size, max_length=max_length,
                               rerank=rerank, rerank_samples=rerank_samples,
                               batch_size=batch_size, precision=precision)
    for line in captioner.notes:
        err.print(f"[yellow]note:[/] {line}", highlight=False)
    if (gates or gates_plot is not None) and captioner.model.gates is None:
        raise ConfigError(f"--gates: {model_dir} has no gates: it was trained with plain cross-attention (`vgpt "
                          "train`'s default, --gating none); train with --gating srau for per-token gates")
    if attention is not None:
        from vgpt_cli.evaluate.attention_figure import check_grid

        check_grid(captioner.backbone)
    with decode_progress() as progress:
        results = captioner.caption(paths, gates=gates or gates_plot is not None, attention=attention is not None,
                                    progress=progress(len(paths)))
    results = missing + results
    good = [r for r in results if r.ok]
    bad = [r for r in results if not r.ok]

    if as_json:
        print_json([r.to_dict() for r in results])
    elif as_jsonl:
        for r in results:
            sys.stdout.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        table = Table(show_header=True, header_style="bold")
        table.add_column("image", overflow="fold")
        table.add_column("caption")
        for r in good:
            table.add_row(r.source, r.caption)
        print_table(table)
        if gates:
            for r in good:
                gt = Table(title=r.source, title_justify="left")
                for col in ("token", "linguistic", "visual"):
                    gt.add_column(col, justify="left" if col == "token" else "right")
                for t in r.tokens or []:
                    gt.add_row(t["token"], f"{t['linguistic']:.3f}", f"{t['visual']:.3f}")
                print_table(gt)
    if gates_plot is not None and good:
        from vgpt_cli.evaluate.gates import plot_gates

        plot_gates(good, gates_plot)
        err.print(f"wrote {gates_plot}", highlight=False)
    if attention is not None and good:
        from vgpt_cli.evaluate.attention_figure import write_figures

        written = write_figures(captioner, good, attention)
        err.print(f"wrote {len(written)} attention figure(s) into {attention}", highlight=False)
    for r in bad:
        err.print(f"[red]failed:[/] {r.source}: {r.error}", highlight=False)
    o = captioner.options
    cut = cut_note(sum(r.cut for r in good), len(good), o.max_length)
    if cut:  # also "cut": true on each such image in --json / --jsonl
        err.print(f"[yellow]note:[/] {cut}", highlight=False)
    err.print(f"captioned {len(good)} of {len(results)} images with {model_dir} (beam {o.beam_size}, at most "
              f"{o.max_length} tokens, " + (f"consensus of {o.rerank} neighbours, " if o.rerank and (o.beam_size > 1 or o.rerank_samples) else "")
              + (f"{o.rerank_samples} sampled candidates, " if o.rerank_samples else "")
              + f"{precision})", highlight=False)
    if bad and not good:
        raise DataError(f"no image could be captioned (first: {bad[0].source}: {bad[0].error}); give readable "
                        "JPEG/PNG files")
    if bad:
        raise PartialRunError(f"{len(bad)} of {len(results)} images could not be captioned (first: {bad[0].source}: "
                              f"{bad[0].error}); the others were captioned")
