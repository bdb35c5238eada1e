"""`vgpt prepare FORMAT`: one subcommand per dataset format. Option parsing and printing only."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from vgpt_cli.commands.common import RateColumn, err, friendly_errors, print_json, workspace
from vgpt_cli.data.build import SamplingOptions, build_manifest, prepare_shapes, summary, write_manifest
from vgpt_cli.data.manifest import Manifest
from vgpt_cli.data.source import Source
from vgpt_cli.workspace import check_name

app = typer.Typer(
    help="Prepare a dataset manifest (splits, images, captions, few-shot sample) in the workspace.\n\n"
    "Formats: coco, flickr8k, flickr30k, folder, iu-xray, cc, shapes (built-in demo data).\n\n"
    "Example:\n\n    vgpt prepare coco --fraction 0.01\n\n    vgpt prepare shapes --count 2000",
    no_args_is_help=True,
)


class Unit(str, Enum):
    caption = "caption"
    image = "image"


# --- options every format shares ------------------------------------------------------------
NameOpt = Annotated[str | None, typer.Option("--name", help="Dataset name in the workspace (default: the format).")]
FractionOpt = Annotated[float | None, typer.Option(
    "--fraction", help="Sample this fraction of the training pool, in (0, 1]; e.g. 0.01 for 1%.")]
CountOpt = Annotated[int | None, typer.Option(
    "--count", help="Sample exactly this many training captions (or images with --unit image).")]
UnitOpt = Annotated[Unit, typer.Option(
    "--unit", help="What --fraction/--count counts: captions (as the authors' code does) or images "
    "(all captions of each sampled image).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the sampling; subsets of one seed are nested.")]
ValSizeOpt = Annotated[int | None, typer.Option(
    "--val-size", help="Keep a seeded subset of this many val images (for faster model selection).")]
TestSizeOpt = Annotated[int | None, typer.Option(
    "--test-size", help="Cut the test split to this many images (recorded; every later report says so).")]
SkipMissingOpt = Annotated[bool, typer.Option(
    "--skip-missing", help="Drop items whose image files are absent (recorded) instead of stopping.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")]
ImagesOpt = Annotated[Path | None, typer.Option("--images", help="The image root folder.")]


def _options(fraction: float | None, count: int | None, unit: Unit, seed: int, val_size: int | None,
             test_size: int | None, skip_missing: bool) -> SamplingOptions:
    """The sampling options, checked: every command calls this before it reads or writes anything."""
    opts = SamplingOptions(fraction=fraction, count=count, unit=unit.value, seed=seed, val_size=val_size,
                           test_size=test_size, skip_missing=skip_missing)
    opts.check()
    return opts


def _name(name: str | None, default: str) -> str:
    """The dataset name, checked before anything is written (the rule of `train --name`)."""
    return check_name(name if name is not None else default, "--name")


def progress_bar(unit: str) -> Progress:
    """A progress bar on stderr; bytes get a transfer speed, other units a rate."""
    if unit == "bytes":
        columns = (DownloadColumn(), TransferSpeedColumn())
    else:
        columns = (MofNCompleteColumn(), RateColumn(unit))
    return Progress(TextColumn("{task.description}"), BarColumn(), *columns, TimeRemainingColumn(),
                    console=err, transient=True)


def _finish(ctx: typer.Context, source: Source, name: str, opts: SamplingOptions, as_json: bool) -> None:
    manifest = build_manifest(source, name, opts)
    _report(manifest, write_manifest(workspace(ctx), manifest), source.format, as_json)


def _report(manifest: Manifest, path: Path, fmt: str, as_json: bool) -> None:
    info = summary(manifest, path)
    name = manifest.dataset
    if as_json:
        print_json(info)
        return
    table = Table(title=f"dataset {name!r} ({fmt})", title_justify="left")
    for col in ("split", "images", "captions"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, c in info["counts"].items():
        table.add_row(split, f"{c['items']:,}", f"{c['captions']:,}")
    err.print(table)
    s = manifest.sampling
    what = (f"fraction {s['fraction']}" if s["fraction"] is not None
            else f"count {s['count']}" if s["count"] is not None else "the whole pool")
    err.print(f"sampled {what} of {s['pool_captions']:,} captions / {s['pool_images']:,} images "
              f"(unit {s['unit']}, seed {s['seed']})")
    for note in manifest.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    err.print(f"wrote {path}")
    err.print("next: [bold]vgpt extract-features[/]")


# --- formats --------------------------------------------------------------------------------
@app.command("coco")
@friendly_errors
def coco(
    ctx: typer.Context,
    root: Annotated[Path | None, typer.Option(
        "--root", help="Folder with dataset_coco.json, train2014/ and val2014/ (default: <workspace>/sources/coco).")] = None,
    annotations: Annotated[Path | None, typer.Option(
        "--annotations", help="Karpathy's dataset_coco.json (default: <root>/dataset_coco.json).")] = None,
    images: Annotated[Path | None, typer.Option(
        "--images", help="Folder holding train2014/ and val2014/ (default: <root>).")] = None,
    download: Annotated[bool, typer.Option(
        "--download", help="Fetch caption_datasets.zip and the COCO 2014 image zips into --root first "
        "(resumable, checksummed).")] = False,
    name: NameOpt = None, fraction: FractionOpt = None, count: CountOpt = None, unit: UnitOpt = Unit.caption,
    seed: SeedOpt = 42, val_size: ValSizeOpt = None, test_size: TestSizeOpt = None,
    skip_missing: SkipMissingOpt = False, as_json: JsonOpt = False,
) -> None:
    """COCO 2014 with Karpathy's splits (train+restval pool, 5,000 val, 5,000 test).

    Example:

        vgpt prepare coco --fraction 0.01

        vgpt prepare coco --root /data/coco --fraction 0.005 --val-size 1000 --seed 1
    """
    from vgpt_cli.data.coco import default_root, read_coco

    ws = workspace(ctx)
    name = _name(name, "coco")
    opts = _options(fraction, count, unit, seed, val_size, test_size, skip_missing)
    root = Path(root) if root else default_root(ws.root)
    if download:
        from vgpt_cli.data.download import download_coco

        download_coco(root, progress=progress_bar)
    _finish(ctx, read_coco(root, annotations, images), name, opts, as_json)


@app.command("shapes")
@friendly_errors
def shapes(
    ctx: typer.Context,
    count: Annotated[int, typer.Option(
        "--count", help="How many scenes to generate (split 80/10/10 by --seed).")] = 2000,
    root: Annotated[Path | None, typer.Option(
        "--root", help="Where to write the images and dataset_shapes.json (default: <workspace>/sources/<name>).")
    ] = None,
    name: NameOpt = None, fraction: FractionOpt = None, unit: UnitOpt = Unit.caption,
    seed: SeedOpt = 42, val_size: ValSizeOpt = None, test_size: TestSizeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Built-in demo data: 1-3 coloured shapes per 224x224 PNG, 5 grounded captions per scene.

    Deterministic by --seed. Here --count is the number of scenes; --fraction then samples the
    training pool as for any other format.

    Example:

        vgpt prepare shapes

        vgpt prepare shapes --count 500 --seed 1 --name shapes-small
    """
    from vgpt_cli.errors import ConfigError

    if count < 10:
        raise ConfigError(f"--count {count}: need at least 10 scenes for an 80/10/10 split")
    name = _name(name, "shapes")
    opts = _options(fraction, None, unit, seed, val_size, test_size, False)
    with progress_bar("scenes") as bar:
        task = bar.add_task("rendering scenes", total=count)
        manifest, path = prepare_shapes(workspace(ctx), count, seed, opts, name=name, root=root,
                                        on_progress=lambda n: bar.advance(task, n))
    _report(manifest, path, "shapes", as_json)



@app.command("flickr8k")
@friendly_errors
def flickr8k(
    ctx: typer.Context,
    root: Annotated[Path | None, typer.Option(
        "--root", help="Folder with the annotation file and Flicker8k_Dataset/ "
        "(default: <workspace>/sources/flickr8k).")] = None,
    annotations: Annotated[Path | None, typer.Option(
        "--annotations", help="Karpathy's dataset_flickr8k.json, or the release's Flickr8k.token.txt "
        "(default: whichever is in --root).")] = None,
    images: ImagesOpt = None,
    splits_dir: Annotated[Path | None, typer.Option(
        "--splits-dir", help="Folder with Flickr_8k.{train,dev,test}Images.txt (default: beside the token file).")
    ] = None,
    name: NameOpt = None, fraction: FractionOpt = None, count: CountOpt = None, unit: UnitOpt = Unit.caption,
    seed: SeedOpt = 42, val_size: ValSizeOpt = None, test_size: TestSizeOpt = None,
    skip_missing: SkipMissingOpt = False, as_json: JsonOpt = False,
) -> None:
    """Flickr8k: Karpathy's split file, or the original release (token file + split lists).

    Example:

        vgpt prepare flickr8k --root /data/flickr8k --fraction 0.01

        vgpt prepare flickr8k --annotations Flickr8k.token.txt --images Flicker8k_Dataset --count 500
    """
    from vgpt_cli.data.flickr import default_root, read_flickr

    name = _name(name, "flickr8k")
    opts = _options(fraction, count, unit, seed, val_size, test_size, skip_missing)
    root = Path(root) if root else default_root(workspace(ctx).root, "flickr8k")
    _finish(ctx, read_flickr("flickr8k", root, annotations, images, splits_dir), name, opts, as_json)


@app.command("flickr30k")
@friendly_errors
def flickr30k(
    ctx: typer.Context,
    root: Annotated[Path | None, typer.Option(
        "--root", help="Folder with dataset_flickr30k.json and flickr30k-images/ "
        "(default: <workspace>/sources/flickr30k).")] = None,
    annotations: Annotated[Path | None, typer.Option(
        "--annotations", help="Karpathy's dataset_flickr30k.json (default: <root>/dataset_flickr30k.json).")] = None,
    images: ImagesOpt = None,
    name: NameOpt = None, fraction: FractionOpt = None, count: CountOpt = None, unit: UnitOpt = Unit.caption,
    seed: SeedOpt = 42, val_size: ValSizeOpt = None, test_size: TestSizeOpt = None,
    skip_missing: SkipMissingOpt = False, as_json: JsonOpt = False,
) -> None:
    """Flickr30k with Karpathy's splits.

    Example:

        vgpt prepare flickr30k --root /data/flickr30k --fraction 0.01
    """
    from vgpt_cli.data.flickr import default_root, read_flickr

    name = _name(name, "flickr30k")
    opts = _options(fraction, count, unit, seed, val_size, test_size, skip_missing)
    root = Path(root) if root else default_root(workspace(ctx).root, "flickr30k")
    _finish(ctx, read_flickr("flickr30k", root, annotations, images), name, opts, as_json)


ValFractionOpt = Annotated[float, typer.Option(
    "--val-fraction", help="Seeded fraction of the images for val (when the source has no split).")]
TestFractionOpt = Annotated[float, typer.Option(
    "--test-fraction", help="Seeded fraction of the images for test (when the source has no split).")]


@app.command("folder")
@friendly_errors
def folder(
    ctx: typer.Context,
    images: Annotated[Path, typer.Argument(help="The folder of images; captions-file paths are relative to it.")],
    captions: Annotated[Path, typer.Option(
        "--captions", help="CSV (header: image,caption[,split]) or JSONL ({\"image\", \"caption\"}) file.")],
    val_fraction: ValFractionOpt = 0.1, test_fraction: TestFractionOpt = 0.1,
    name: NameOpt = None, fraction: FractionOpt = None, count: CountOpt = None, unit: UnitOpt = Unit.caption,
    seed: SeedOpt = 42, val_size: ValSizeOpt = None, test_size: TestSizeOpt = None,
    skip_missing: SkipMissingOpt = False, as_json: JsonOpt = False,
) -> None:
    """A folder of images plus a captions file (several captions per image allowed).

    Example:

        vgpt prepare folder photos/ --captions photos/captions.csv --name pets

        vgpt prepare folder photos/ --captions caps.jsonl --val-fraction 0.05 --test-fraction 0.05
    """
    from vgpt_cli.data.folder import read_folder

    name = _name(name, "folder")
    opts = _options(fraction, count, unit, seed, val_size, test_size, skip_missing)
    source = read_folder(images, captions, val_fraction, test_fraction, seed)
    _finish(ctx, source, name, opts, as_json)


@app.command("iu-xray")
@friendly_errors
def iu_xray(
    ctx: typer.Context,
    annotations: Annotated[Path, typer.Option(
        "--annotations", help="R2Gen's iu_xray annotation.json.")],
    images: Annotated[Path | None, typer.Option(
        "--images", help="R2Gen's images/ folder (default: beside annotation.json).")] = None,
    name: NameOpt = None, fraction: FractionOpt = None, count: CountOpt = None, unit: UnitOpt = Unit.caption,
    seed: SeedOpt = 42, val_size: ValSizeOpt = None, test_size: TestSizeOpt = None,
    skip_missing: SkipMissingOpt = False, as_json: JsonOpt = False,
) -> None:
    """IU X-ray radiology reports (R2Gen split): one item per study, its views, one report.

    Example:

        vgpt prepare iu-xray --annotations iu_xray/annotation.json --fraction 0.1
    """
    from vgpt_cli.data.iu_xray import read_iu_xray

    name = _name(name, "iu-xray")
    opts = _options(fraction, count, unit, seed, val_size, test_size, skip_missing)
    _finish(ctx, read_iu_xray(annotations, images), name, opts, as_json)


@app.command("cc")
@friendly_errors
def cc(
    ctx: typer.Context,
    folder: Annotated[Path | None, typer.Argument(
        help="img2dataset output folder (files format: 00000/000000000.jpg/.txt/.json).")] = None,
    tsv: Annotated[Path | None, typer.Option(
        "--tsv", help="The release TSV (caption<TAB>url); needs --images.")] = None,
    images: Annotated[Path | None, typer.Option(
        "--images", help="With --tsv: the folder holding the downloaded images, named 000000000.jpg, ...")] = None,
    val_fraction: ValFractionOpt = 0.1, test_fraction: TestFractionOpt = 0.1,
    name: NameOpt = None, fraction: FractionOpt = None, count: CountOpt = None, unit: UnitOpt = Unit.caption,
    seed: SeedOpt = 42, val_size: ValSizeOpt = None, test_size: TestSizeOpt = None,
    skip_missing: SkipMissingOpt = False, as_json: JsonOpt = False,
) -> None:
    """Conceptual Captions: img2dataset's files output, or the release TSV plus an images folder.

    Example:

        vgpt prepare cc cc3m_files/ --fraction 0.01

        vgpt prepare cc --tsv Validation_GCC-1.1.0-Validation.tsv --images cc_val/ --skip-missing
    """
    from vgpt_cli.data.cc import read_cc_files, read_cc_tsv
    from vgpt_cli.errors import ConfigError

    name = _name(name, "cc")
    opts = _options(fraction, count, unit, seed, val_size, test_size, skip_missing)
    if (folder is None) == (tsv is None):
        raise ConfigError("pass either an img2dataset FOLDER or --tsv FILE --images DIR (one of them)")
    if tsv is not None:
        if images is None:
            raise ConfigError(f"--tsv {tsv}: also pass --images DIR, the folder of the downloaded images")
        source = read_cc_tsv(tsv, images, val_fraction, test_fraction, seed)
    else:
        source = read_cc_files(folder, val_fraction, test_fraction, seed)
    _finish(ctx, source, name, opts, as_json)
