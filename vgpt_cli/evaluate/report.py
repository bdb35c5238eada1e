"""Evaluation of a workspace split: references from the manifest, decoding, metrics, files written."""

from __future__ import annotations

from pathlib import Path

from vgpt_cli.data.manifest import Manifest
from vgpt_cli.workspace import Workspace


def workspace_manifest(ws: Workspace) -> Manifest:
    name = ws.current("dataset", "dataset", "vgpt prepare ...")
    return Manifest.load(ws.manifest_path(name))


def workspace_references(ws: Workspace, split: str) -> tuple[dict[str, list[str]], str]:
    """{id: [reference captions]} of `split` of the workspace's current dataset, and a name for it."""
    manifest = workspace_manifest(ws)
    refs = {item.id: list(item.captions) for item in manifest.items(split) if item.captions}
    return refs, f"{manifest.dataset}/{split} ({Path(ws.manifest_path(manifest.dataset))})"
