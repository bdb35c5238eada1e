"""Typed errors. The CLI turns each into one line on stderr and a non-zero exit code."""

from __future__ import annotations


class VgptError(Exception):
    """A failure the user can fix: the message names the file, the item and the fix."""

    exit_code = 2


class ConfigError(VgptError):
    """An option or configuration value is invalid."""


class DataError(VgptError):
    """An input file (annotations, images, features) is missing or malformed."""


class DiskFullError(DataError):
    """The disk filled while a file was written (vgpt_cli.workspace.atomic_write): its previous version is intact."""


class ModelLoadError(VgptError):
    """A model folder, checkpoint or language model cannot be loaded."""


class PartialRunError(VgptError):
    """Some items were processed and some failed; the output for the good ones was written."""

    exit_code = 3
