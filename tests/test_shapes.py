"""The built-in shapes data set: deterministic PNGs, captions grounded in the recorded scene objects."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from vgpt_cli.cli import app
from vgpt_cli.data.manifest import Manifest
from vgpt_cli.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    grounded_correct,
    grounded_score,
    make_scene,
    object_scores,
    scene_captions,
    write_shapes,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def shapes_ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("ws")
    result = runner.invoke(app, ["-w", str(ws), "prepare", "shapes", "--count", "60", "--seed", "7"])
    assert result.exit_code == 0, result.output
    return ws


def test_prepare_shapes_writes_a_karpathy_file_pngs_and_a_manifest(shapes_ws):
    m = Manifest.load(shapes_ws / "data" / "shapes" / "manifest.json")
    assert json.loads((shapes_ws / "workspace.json").read_text())["dataset"] == "shapes"
    assert {s: len(items) for s, items in m.splits.items()} == {"train": 48, "val": 6, "test": 6}
    raw = json.loads((shapes_ws / "sources" / "shapes" / "dataset_shapes.json").read_text())
    assert len(raw["images"]) == 60 and {im["split"] for im in raw["images"]} == {"train", "val", "test"}
    for item in m.all_items():
        assert len(item.images) == 1 and Path(item.images[0]).is_file()
        assert len(item.captions) == 5 and len(set(item.captions)) == 5
        assert 1 <= len(item.extra["objects"]) <= 3 and item.extra["background"] in BACKGROUNDS


def test_images_are_real_pngs_showing_the_recorded_objects(shapes_ws):
    m = Manifest.load(shapes_ws / "data" / "shapes" / "manifest.json")
    for item in m.all_items():
        with Image.open(item.images[0]) as im:
            assert im.format == "PNG" and im.size == (224, 224)
            rgb = im.convert("RGB")
            assert rgb.getpixel((0, 0)) == BACKGROUNDS[item.extra["background"]]
            for o in item.extra["objects"]:
                assert rgb.getpixel((o["x"], o["y"])) == COLOURS[o["colour"]], (item.id, o)


def test_captions_agree_with_the_recorded_objects(shapes_ws):
    m = Manifest.load(shapes_ws / "data" / "shapes" / "manifest.json")
    for item in m.all_items():
        objects = item.extra["objects"]
        for caption in item.captions:
            assert grounded_correct(caption, objects), (caption, objects)
            words = re.findall(r"[a-z]+", caption)
            assert 3 <= len(words) <= 20
            for o in objects:  # independently of the parser: each object's words are there, colour first
                assert re.search(rf"\b{o['colour']} (?:(?:small|large) )?{o['shape']}\b", caption), (caption, o)
            named = {w for w in words if w in SHAPES}
            assert named == {o["shape"] for o in objects}


def test_same_seed_same_files_other_seed_other(tmp_path):
    a, b, c = (write_shapes(tmp_path / d, 12, s) for d, s in (("a", 3), ("b", 3), ("c", 4)))
    assert a.read_text() == b.read_text() and a.read_text() != c.read_text()
    for i in range(12):
        name = f"images/shapes_{i:06d}.png"
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()
    assert any((a.parent / f"images/shapes_{i:06d}.png").read_bytes() != (c.parent / f"images/shapes_{i:06d}.png")
               .read_bytes() for i in range(12))


def test_same_seed_same_manifest(tmp_path):
    for ws in ("w1", "w2"):
        assert runner.invoke(app, ["-w", str(tmp_path / ws), "prepare", "shapes", "--count", "20",
                                   "--fraction", "0.5"]).exit_code == 0
    a, b = (Manifest.load(tmp_path / ws / "data/shapes/manifest.json").to_dict() for ws in ("w1", "w2"))
    for d in (a, b):  # the paths differ by workspace only
        d.pop("source"), d.pop("image_root")
        for items in d["splits"].values():
            for i in items:
                i["images"] = [Path(p).name for p in i["images"]]
    assert a == b and a["counts"]["train"]["captions"] == 40


def test_scene_vocabulary_is_varied():
    scenes = [make_scene(0, i) for i in range(300)]
    objs = [o for s in scenes for o in s["objects"]]
    assert {len(s["objects"]) for s in scenes} == {1, 2, 3}
    assert {o["colour"] for o in objs} == set(COLOURS) and {o["shape"] for o in objs} == set(SHAPES)
    assert {o["size"] for o in objs} == {"small", "large"} and {s["background"] for s in scenes} == set(BACKGROUNDS)
    starts = {scene_captions(s, 0, i)[0].split()[0] for i, s in enumerate(scenes)}
    assert len(starts) >= 3  # several templates, not one


def test_reading_order_names_objects_top_to_bottom_left_to_right_and_changes_nothing_else():
    from vgpt_cli.data.shapes import POSITIONS, naming_words

    cells = [name for name, _ in POSITIONS]
    multi = [(i, s) for i, s in ((i, make_scene(3, i)) for i in range(200)) if len(s["objects"]) > 1]
    seen_other_order = False
    for i, scene in multi:
        reading, shuffled = scene_captions(scene, 3, i, order="reading"), scene_captions(scene, 3, i)
        assert len(reading) == len(shuffled)
        want = sorted(scene["objects"], key=lambda o: cells.index(o["position"]))
        for caption in reading:
            if " above " in caption or " to the left of " in caption:
                continue  # a relation keeps its own order
            named = [o for _, o in naming_words(caption, scene["objects"])]
            assert named == want, (caption, want)
        # the same templates and words, only the objects' order differs (a 3-object caption with positions
        # gives the first object's only)
        words = lambda cs: [sorted(c.replace(",", "").split()) for c in cs if not c.startswith("there is")]  # noqa: E731
        assert words(reading) == words(shuffled)
        seen_other_order |= reading != shuffled
    assert seen_other_order
    with pytest.raises(ValueError, match="caption order 'sideways'"):
        scene_captions(multi[0][1], 3, 0, order="sideways")


SCENE = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}]


@pytest.mark.parametrize(("caption", "ok"), [
    ("a red circle and a blue square on a grey background", True),
    ("there is a small blue square at the top and a large red circle on the left", True),
    ("A Red Circle, a blue square.", True),
    ("a red circle", False),  # misses the square
    ("a blue circle and a red square", False),  # colours swapped
    ("a red circle, a blue square and a green star", False),  # names an object that is not there
    ("a red circle and a blue triangle", False),
    ("a circle and a square", False),  # no colours named
    ("", False),
])
def test_grounded_correct(caption, ok):
    assert grounded_correct(caption, SCENE) is ok


def test_grounded_score():
    objects = {"a": SCENE, "b": [{"colour": "green", "shape": "star"}]}
    assert grounded_score({"a": "a red circle and a blue square", "b": "a green star"}, objects) == 1.0
    assert grounded_score({"a": "a red circle", "b": "a green star"}, objects) == 0.5
    assert grounded_score({"b": "a yellow star"}, objects) == 0.0
    with pytest.raises(KeyError):
        grounded_score({"zzz": "a red circle"}, objects)


def test_object_scores_give_partial_credit_by_hand():
    objects = {"a": SCENE, "b": [{"colour": "green", "shape": "star"}]}
    perfect = object_scores({"a": "a red circle and a blue square", "b": "a green star"}, objects)
    assert perfect == {"grounded": 1.0, "object_f1": 1.0, "shape_f1": 1.0}
    # a: one pair right, one colour wrong (red square: a wrong pair, and the blue square missed);
    # b: a yellow star (colour wrong, shape right). Pairs: said 3, true 3, right 1 -> F1 2/6.
    # Shapes: said {circle, square} + {star}, true the same -> 1.0.
    got = object_scores({"a": "a red circle and a red square", "b": "a yellow star"}, objects)
    assert got["grounded"] == 0.0 and got["object_f1"] == pytest.approx(2 / 6) and got["shape_f1"] == 1.0
    # nothing named: recall 0 -> F1 0; an extra triangle costs shape precision: 2*3 / (4 + 3)
    assert object_scores({"a": "a picture", "b": "nothing"}, objects)["object_f1"] == 0.0
    extra = object_scores({"a": "a red circle, a blue square and a triangle", "b": "a green star"}, objects)
    assert extra["grounded"] == 1.0  # an uncoloured extra shape names no (colour, shape) pair
    assert extra["shape_f1"] == pytest.approx(6 / 7)
