"""Backbone features: timm backbones (+ offline EfficientNet-Lite0 weights), extraction, the store."""

from __future__ import annotations

from vgpt_cli.features.backbone import Backbone as Backbone
from vgpt_cli.features.backbone import load_backbone as load_backbone
from vgpt_cli.features.backbone import load_backbone_from_meta as load_backbone_from_meta
from vgpt_cli.features.backbone import load_default_backbone as load_default_backbone
from vgpt_cli.features.extract import ExtractSummary as ExtractSummary
from vgpt_cli.features.extract import extract_items as extract_items
from vgpt_cli.features.extract import import_hdf5 as import_hdf5
from vgpt_cli.features.images import BadImage as BadImage
from vgpt_cli.features.images import open_rgb as open_rgb
from vgpt_cli.features.images import open_rgb_bytes as open_rgb_bytes
from vgpt_cli.features.store import FeatureStore as FeatureStore
from vgpt_cli.features.store import StoreWriter as StoreWriter
from vgpt_cli.features.store import open_workspace_store as open_workspace_store
