"""The registry of `vgpt prepare` formats.

Each data/<format>.py describes its format as a `DatasetFormat` (its reader, its own options, its
examples) and calls `register` at import; `formats()` imports every module of this package, so adding
a format is one new file. commands/prepare.py makes one subcommand per registered format from these
records plus `SHARED`, the options every format takes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from vgpt_cli.data.build import SamplingOptions, build_manifest, write_manifest
from vgpt_cli.data.download import ProgressFactory
from vgpt_cli.data.manifest import Manifest
from vgpt_cli.data.sampling import UNITS
from vgpt_cli.data.source import Source
from vgpt_cli.files import check_name
from vgpt_cli.workspace import Workspace

# --unit's choices, from the sampler's own list (an Enum, so that --help lists them)
Unit = Enum("Unit", {u: u for u in UNITS}, type=str)


@dataclass(frozen=True)
class Opt:
    """One command-line parameter: the reader's keyword, its type, help and default in one declaration.

    A default of None (and not required) makes the value optional (`type | None`). The flag is
    --<name with dashes> unless given; positional=True makes it an argument instead of an option."""

    name: str
    type: type
    help: str
    default: Any = None
    flag: str | None = None
    required: bool = False
    positional: bool = False

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


# The options every format takes (unless it declares its own of that name, or leaves one out with
# `without`), in the order --help lists them after the format's own.
SHARED: tuple[Opt, ...] = (
    Opt("name", str, "Dataset name in the workspace (default: the format)."),
    Opt("fraction", float, "Sample this fraction of the training pool, in (0, 1]; e.g. 0.01 for 1%."),
    Opt("count", int, "Sample exactly this many training captions (or images with --unit image)."),
    Opt("unit", Unit, "What --fraction/--count counts: captions (as the authors' code does) or images "
        "(all captions of each sampled image).", Unit.caption),
    Opt("seed", int, "Seed of the sampling; subsets of one seed are nested.", 42),
    Opt("val_size", int, "Keep a seeded subset of this many val images (for faster model selection)."),
    Opt("test_size", int, "Cut the test split to this many images (recorded; every later report says so)."),
    Opt("skip_missing", bool, "Drop items whose image files are absent (recorded) instead of stopping.", False),
)

# Options more than one format declares, with the same flag, help and default.
VAL_FRACTION = Opt("val_fraction", float, "Seeded fraction of the images for val (when the source has no split).",
                   0.1)
TEST_FRACTION = Opt("test_fraction", float,
                    "Seeded fraction of the images for test (when the source has no split).", 0.1)


@dataclass
class Request:
    """What a reader is given besides its own options: all of it checked before anything is read."""

    workspace: Workspace
    name: str
    sampling: SamplingOptions
    progress: ProgressFactory


@dataclass(frozen=True)
class DatasetFormat:
    """A `vgpt prepare` format. `read(request, **own options)` returns the Source that the shared
    code validates, samples and writes; a format that must write its files itself (shapes renders
    its scenes into place) gives `build(request, **own options) -> (manifest, path)` instead."""

    name: str  # the subcommand, and the dataset name unless --name says otherwise
    help: str  # one line, listed by `vgpt prepare --help`
    examples: tuple[str, ...]  # command lines shown under "Example:" by `vgpt prepare NAME --help`
    read: Callable[..., Source] | None = None
    build: Callable[..., tuple[Manifest, Path]] | None = None
    options: tuple[Opt, ...] = ()  # its own, listed first; one named like a shared option replaces it
    without: tuple[str, ...] = ()  # shared options that mean nothing for it
    details: str = ""  # paragraphs between the one-line help and the examples

    def __post_init__(self) -> None:
        if (self.read is None) == (self.build is None):
            raise ValueError(f"format {self.name!r}: give read or build, one of them")
        if not self.examples:
            raise ValueError(f"format {self.name!r}: --help needs at least one example")

    def shared_taken(self) -> tuple[Opt, ...]:
        own = {o.name for o in self.options}
        return tuple(o for o in SHARED if o.name not in own and o.name not in self.without)

    def params(self) -> tuple[Opt, ...]:
        return self.options + self.shared_taken()

    def doc(self) -> str:
        parts = [self.help, *([self.details] if self.details else []), "Example:",
                 *(f"    {e}" for e in self.examples)]
        return "\n\n".join(parts)

    def prepare(self, ws: Workspace, values: dict[str, Any], progress: ProgressFactory) -> tuple[Manifest, Path]:
        """Check the shared options, then read (or build) and write the manifest; values holds every
        parameter of `params()` by name."""
        taken = {o.name for o in self.shared_taken()}
        shared = {o.name: values[o.name] if o.name in taken else o.default for o in SHARED}
        own = {o.name: values[o.name] for o in self.options}
        name = shared.pop("name")
        name = check_name(name if name is not None else self.name, "--name")
        sampling = SamplingOptions(**{k: v.value if isinstance(v, Enum) else v for k, v in shared.items()})
        sampling.check()
        request = Request(ws, name, sampling, progress)
        if self.build is not None:
            return self.build(request, **own)
        manifest = build_manifest(self.read(request, **own), name, sampling)
        return manifest, write_manifest(ws, manifest)


_FORMATS: dict[str, DatasetFormat] = {}


def register(fmt: DatasetFormat) -> DatasetFormat:
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def formats() -> list[DatasetFormat]:
    """Every registered format, after importing each module of this package once (which registers them)."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")
    return list(_FORMATS.values())
