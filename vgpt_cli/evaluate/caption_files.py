"""Caption files: reference and prediction files in (COCO format or a plain JSON mapping, checked with
pycocotools), COCO results out.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vgpt_cli.errors import DataError
from vgpt_cli.files import read_json


@contextlib.contextmanager
def _quiet_stdout():
    """pycocotools and BleuScorer chat on stdout, which carries only results here: silence them."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _check_text(path: Path | str, key: str, text: Any, what: str) -> str:
    """A caption read from a file: a string that is valid Unicode (no lone surrogates such as
    "\\ud800", which JSON allows and no tokenizer can write out)."""
    if not isinstance(text, str):
        raise DataError(f"{path}: item {key!r}: {what} {text!r} is not a string; fix the file")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{path}: item {key!r}: {what} holds an invalid character ({e.reason}, a lone "
                        f"surrogate {text[e.start]!a}); fix the file") from None
    return text


def _read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path")
    return read_json(path, "fix or regenerate the file", error=DataError)


def _coco_from_references(references: Mapping[str, Sequence[str]]):
    """An in-memory pycocotools COCO object with string image ids, for loadRes validation."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": [{"id": k} for k in references],
        "annotations": [{"image_id": k, "caption": c, "id": i}
                        for i, (k, c) in enumerate(((k, c) for k, v in references.items() for c in v), 1)],
    }
    with _quiet_stdout():
        coco.createIndex()
    return coco


def load_references(path: Path) -> dict[str, list[str]]:
    """Ground-truth captions from a COCO-format annotation file ({"images", "annotations": [{"image_id",
    "caption"}]}, read with pycocotools) or a JSON mapping {"image id": ["ref", ...]} (or one string).
    Ids become strings."""
    path = Path(path)
    raw = _read_json(path)
    if isinstance(raw, dict) and "annotations" in raw:
        from pycocotools.coco import COCO

        try:
            with _quiet_stdout():
                coco = COCO(str(path))
            refs: dict[str, list[str]] = {}
            for img_id in coco.getImgIds() or list(coco.imgToAnns):
                caps = [_check_text(path, str(img_id), a["caption"], "reference caption")
                        for a in coco.imgToAnns.get(img_id, [])]
                if caps:
                    refs[str(img_id)] = caps
            for img_id, anns in coco.imgToAnns.items():  # annotation files without an "images" list
                refs.setdefault(str(img_id), [_check_text(path, str(img_id), a["caption"], "reference caption")
                                              for a in anns])
        except (KeyError, TypeError, AssertionError) as e:
            raise DataError(f"{path}: not a COCO caption annotation file (missing {e}); each annotation needs "
                            "'image_id' and 'caption'") from e
        if not refs:
            raise DataError(f"{path}: no caption annotations found")
        return refs
    if isinstance(raw, dict) and raw:
        refs = {}
        for k, v in raw.items():
            caps = [v] if isinstance(v, str) else v
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
                raise DataError(f"{path}: item {k!r} must map to a caption or a non-empty list of captions")
            refs[str(k)] = [_check_text(path, str(k), c, "reference caption") for c in caps]
        return refs
    raise DataError(f"{path}: expected a COCO annotation file or a JSON object {{\"image id\": [\"ref\", ...]}}")


def load_predictions(path: Path, references: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """Candidate captions from a COCO results file ([{"image_id", "caption"}]) or a JSON mapping
    {"image id": "caption"}. With `references`, the ids are validated with pycocotools' loadRes."""
    path = Path(path)
    raw = _read_json(path)
    if isinstance(raw, list):
        preds: dict[str, str] = {}
        for i, r in enumerate(raw):
            if not isinstance(r, dict) or "image_id" not in r or not isinstance(r.get("caption"), str):
                raise DataError(f"{path}: result #{i} is not {{\"image_id\": ..., \"caption\": \"...\"}}")
            k = str(r["image_id"])
            if k in preds:
                raise DataError(f"{path}: image_id {k!r} has more than one caption; keep one per image")
            preds[k] = _check_text(path, k, r["caption"], "caption")
    elif isinstance(raw, dict):
        preds = {}
        for k, v in raw.items():
            if isinstance(v, list) and len(v) == 1:
                v = v[0]
            if not isinstance(v, str):
                raise DataError(f"{path}: item {k!r} must map to one caption string")
            preds[str(k)] = _check_text(path, str(k), v, "caption")
    else:
        raise DataError(f"{path}: expected a COCO results list or a JSON object {{\"image id\": \"caption\"}}")
    if not preds:
        raise DataError(f"{path}: no predictions in the file")
    if references is not None:
        missing = [k for k in preds if k not in references]
        if missing:
            raise DataError(f"{path}: {len(missing)} image id(s) are not in the references, e.g. {missing[0]!r}; "
                            "check that predictions and references are for the same images")
        coco = _coco_from_references(references)
        try:
            with _quiet_stdout():
                coco.loadRes([{"image_id": k, "caption": v} for k, v in preds.items()])
        except (AssertionError, KeyError) as e:
            raise DataError(f"{path}: pycocotools rejected the results ({e})") from e
    return preds


def coco_results(predictions: Mapping[str, str]) -> list[dict[str, Any]]:
    """{id: caption} -> the COCO results format, with integer image ids where the id is a number."""
    return [{"image_id": int(k) if k.isdigit() else k, "caption": v} for k, v in predictions.items()]
