"""`vgpt prepare coco` and the shared sampling / validation, on Karpathy files written in the public layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_coco
from typer.testing import CliRunner

from vgpt_cli.cli import app
from vgpt_cli.data.build import SamplingOptions, build_manifest
from vgpt_cli.data.coco import read_coco
from vgpt_cli.data.manifest import Manifest
from vgpt_cli.text import normalize_caption

runner = CliRunner()


@pytest.fixture()
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    write_coco(root)
    return root


def prepare(ws: Path, *args: str):
    return runner.invoke(app, ["-w", str(ws), "prepare", *args])


def sampled(manifest: Manifest) -> set[tuple[str, str]]:
    return {(i.id, c) for i in manifest.splits["train"] for c in i.captions}


def build(root: Path, **kw) -> Manifest:
    return build_manifest(read_coco(root), "coco", SamplingOptions(**kw))


# --- the happy path ---------------------------------------------------------------------------
def test_coco_splits_paths_captions_and_workspace(coco_root, tmp_path):
    ws = tmp_path / "ws"
    result = prepare(ws, "coco", "--root", str(coco_root))
    assert result.exit_code == 0, result.output
    m = Manifest.load(ws / "data" / "coco" / "manifest.json")
    assert json.loads((ws / "workspace.json").read_text())["dataset"] == "coco"
    counts = m.counts()
    assert counts["train"] == {"items": 50, "images": 50, "captions": 250}  # train + restval
    assert counts["val"]["items"] == 8 and counts["test"]["items"] == 6
    raw = json.loads((coco_root / "dataset_coco.json").read_text())["images"]
    by_id = {str(im["cocoid"]): im for im in raw}
    for split, items in m.splits.items():
        for item in items:
            im = by_id[item.id]
            assert im["split"] in ({"train", "restval"} if split == "train" else {split})
            assert item.images == [str((coco_root / im["filepath"] / im["filename"]).resolve())]
            assert Path(item.images[0]).is_absolute() and Path(item.images[0]).is_file()
            assert item.captions == [normalize_caption(s["raw"]) for s in im["sentences"]]
            assert item.captions[0].startswith("a man riding")
    assert {i.id for i in m.splits["val"]} == {str(im["cocoid"]) for im in raw if im["split"] == "val"}
    assert {i.id for i in m.splits["test"]} == {str(im["cocoid"]) for im in raw if im["split"] == "test"}
    assert m.source["sha256"] and m.source["path"].endswith("dataset_coco.json")
    assert "vgpt extract-features" in result.output


def test_json_summary_is_machine_readable(coco_root, tmp_path):
    result = prepare(tmp_path / "ws", "coco", "--root", str(coco_root), "--fraction", "0.1", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["counts"]["train"]["captions"] == 25
    assert info["sampling"]["fraction"] == 0.1 and info["sampling"]["pool_captions"] == 250
    assert Path(info["manifest"]).is_file()


# --- sampling -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "captions", "images"), [
    ({"fraction": 0.1}, 25, None), ({"fraction": 0.5}, 125, None), ({"count": 7}, 7, None),
    ({"fraction": 1.0}, 250, 50), ({"fraction": 0.1, "unit": "image"}, 25, 5),
    ({"count": 3, "unit": "image"}, 15, 3), ({"fraction": 0.013}, 3, None),  # 3.25 -> 3
])
def test_exact_sampled_counts(coco_root, args, captions, images):
    m = build(coco_root, **args)
    c = m.counts()["train"]
    assert c["captions"] == captions
    if images is not None:
        assert c["images"] == images
    assert m.sampling["selected_captions"] == captions
    # caption unit: sampled captions grouped back by image, each image once
    ids = [i.id for i in m.splits["train"]]
    assert len(ids) == len(set(ids))
    assert len(sampled(m)) == captions


@pytest.mark.parametrize("unit", ["caption", "image"])
def test_subsets_are_nested_for_one_seed(coco_root, unit):
    sets = [sampled(build(coco_root, fraction=f, unit=unit, seed=3)) for f in (0.04, 0.1, 0.3, 0.7)]
    for small, large in zip(sets, sets[1:]):
        assert small < large


def test_same_seed_same_manifest_other_seed_other(coco_root):
    a = build(coco_root, fraction=0.2, seed=1).to_dict()
    b = build(coco_root, fraction=0.2, seed=1).to_dict()
    c = build(coco_root, fraction=0.2, seed=2).to_dict()
    assert a == b
    assert a["splits"]["train"] != c["splits"]["train"]
    assert a["counts"]["train"]["captions"] == c["counts"]["train"]["captions"] == 50


def test_val_size_and_test_size_are_recorded(coco_root):
    m = build(coco_root, val_size=3, seed=5)
    assert len(m.splits["val"]) == 3 and len(m.splits["test"]) == 6
    assert not m.sampling["test_cut"]
    assert not any("TEST" in n for n in m.notes)
    m = build(coco_root, test_size=4, seed=5)
    assert len(m.splits["test"]) == 4 and m.sampling["test_cut"] and m.sampling["test_full_images"] == 6
    assert any("TEST SPLIT CUT to 4 of its 6" in n for n in m.notes)
    # a smaller subset lies inside a larger one
    small = {i.id for i in build(coco_root, val_size=2, seed=5).splits["val"]}
    assert small < {i.id for i in build(coco_root, val_size=5, seed=5).splits["val"]}


def test_caption_unit_is_uniform_over_captions(coco_root):
    """Independent check of the sampler: over many seeds each pool caption is picked about equally often."""
    hits: dict[tuple[str, str], int] = {}
    seeds = 200
    for seed in range(seeds):
        for key in sampled(build(coco_root, fraction=0.2, seed=seed)):
            hits[key] = hits.get(key, 0) + 1
    assert len(hits) == 250  # every caption is reachable
    freq = [v / seeds for v in hits.values()]
    assert abs(sum(freq) / len(freq) - 0.2) < 1e-9
    assert max(freq) < 0.35 and min(freq) > 0.07


# --- bad input: one line naming the file and the item, exit code 2, no manifest -----------------
def _bad(ws: Path, *args: str) -> str:
    result = prepare(ws, *args)
    assert result.exit_code == 2, result.output
    assert not (ws / "data").exists() or not list((ws / "data").rglob("manifest.json"))
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_missing_annotation_file_says_where_and_how(tmp_path):
    ws = tmp_path / "ws"
    msg = _bad(ws, "coco", "--fraction", "0.01")
    assert str(ws / "sources" / "coco" / "dataset_coco.json") in msg
    assert "--download" in msg


def test_missing_image_folders_say_how(tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    (root / "dataset_coco.json").write_text('{"images": []}')
    msg = _bad(tmp_path / "ws", "coco", "--root", str(root))
    assert "train2014/" in msg and "--download" in msg


def test_invalid_json(coco_root, tmp_path):
    (coco_root / "dataset_coco.json").write_text('{"images": [')
    msg = _bad(tmp_path / "ws", "coco", "--root", str(coco_root))
    assert "dataset_coco.json" in msg and "not valid JSON" in msg


@pytest.mark.parametrize(("mutate", "expect"), [
    (lambda raw: raw["images"], "top level must be an object"),
    (lambda raw: {"imgs": raw["images"]}, "top level must be an object"),
    (lambda raw: (raw["images"][3].pop("sentences"), raw)[1], "images[3] (cocoid 100021): missing field 'sentences'"),
    (lambda raw: (raw["images"][4].__setitem__("split", "dev"), raw)[1], "images[4] (cocoid 100028): split 'dev'"),
    (lambda raw: (raw["images"][2]["sentences"][1].pop("raw"), raw)[1], "images[2] (cocoid 100014).sentences[1]"),
])
def test_wrong_json_shape(coco_root, tmp_path, mutate, expect):
    path = coco_root / "dataset_coco.json"
    path.write_text(json.dumps(mutate(json.loads(path.read_text()))))
    msg = _bad(tmp_path / "ws", "coco", "--root", str(coco_root))
    assert "dataset_coco.json" in msg and expect in msg


def test_missing_images_are_counted_and_can_be_skipped(coco_root, tmp_path):
    gone = sorted((coco_root / "train2014").iterdir())[:7]
    for p in gone:
        p.unlink()
    msg = _bad(tmp_path / "ws", "coco", "--root", str(coco_root))
    assert "7 image file(s)" in msg and gone[0].name in msg and "--skip-missing" in msg
    result = prepare(tmp_path / "ws", "coco", "--root", str(coco_root), "--skip-missing")
    assert result.exit_code == 0, result.output
    m = Manifest.load(tmp_path / "ws" / "data" / "coco" / "manifest.json")
    assert m.counts()["train"]["items"] == 43
    assert m.sampling["skip_missing"] and any("--skip-missing: dropped 7" in n for n in m.notes)
    assert not {p.name for p in gone} & {Path(i.images[0]).name for i in m.splits["train"]}


def test_empty_captions_are_dropped_with_a_count(coco_root, tmp_path):
    path = coco_root / "dataset_coco.json"
    raw = json.loads(path.read_text())
    raw["images"][0]["sentences"][0]["raw"] = "   "
    for s in raw["images"][1]["sentences"]:
        s["raw"] = ""
    path.write_text(json.dumps(raw))
    m = build(coco_root)
    assert m.counts()["train"] == {"items": 49, "images": 49, "captions": 244}
    assert any("dropped 6 empty caption(s)" in n for n in m.notes)
    assert any("1 item(s) left with no caption" in n for n in m.notes)


def test_duplicate_ids(coco_root, tmp_path):
    path = coco_root / "dataset_coco.json"
    raw = json.loads(path.read_text())
    raw["images"][5]["cocoid"] = raw["images"][9]["cocoid"]
    path.write_text(json.dumps(raw))
    msg = _bad(tmp_path / "ws", "coco", "--root", str(coco_root))
    assert "duplicate image id" in msg and str(raw["images"][9]["cocoid"]) in msg


@pytest.mark.parametrize("args", [["--fraction", "0"], ["--fraction", "1.5"], ["--fraction", "-0.1"],
                                  ["--count", "251"], ["--count", "51", "--unit", "image"], ["--count", "0"],
                                  ["--fraction", "0.001"], ["--test-size", "7"], ["--val-size", "0"],
                                  ["--fraction", "0.1", "--count", "3"]])
def test_bad_sampling_options(coco_root, tmp_path, args):
    msg = _bad(tmp_path / "ws", "coco", "--root", str(coco_root), *args)
    assert args[0] in msg


def test_paths_escaping_the_image_root_are_refused(coco_root, tmp_path):
    path = coco_root / "dataset_coco.json"
    raw = json.loads(path.read_text())
    (tmp_path / "secret.jpg").write_bytes(b"x")
    raw["images"][6]["filepath"] = "../.."
    raw["images"][6]["filename"] = "secret.jpg"
    path.write_text(json.dumps(raw))
    msg = _bad(tmp_path / "ws", "coco", "--root", str(coco_root))
    assert "images[6]" in msg and "escapes the image root" in msg


def test_help_lists_formats_with_examples():
    result = runner.invoke(app, ["prepare", "--help"])
    assert result.exit_code == 0
    for fmt in ("coco", "shapes"):
        assert fmt in result.output
        sub = runner.invoke(app, ["prepare", fmt, "--help"])
        assert sub.exit_code == 0 and "Example:" in sub.output and f"vgpt prepare {fmt}" in sub.output


@pytest.mark.parametrize("text", ["", " ", "\t\n", "\u00a0", "\u2003\u3000", "\x1c\x1d", "\u200b", " a ", ".", "\u00a0x"])
def test_emptiness_check_agrees_with_the_normaliser(text):
    """build.py drops a caption when text.strip() is empty and normalises later: both must agree."""
    assert (normalize_caption(text) == "") == (text.strip() == "")


# --- the format registry ----------------------------------------------------------------------
def _prepare_commands(typer_app) -> dict:
    import typer.main

    group = typer.main.get_command(typer_app)
    return group.commands["prepare"].commands if "prepare" in group.commands else group.commands


def test_every_registered_format_is_a_subcommand_with_its_example():
    from vgpt_cli.data.formats import formats

    registered = {f.name: f for f in formats()}
    commands = _prepare_commands(app)
    assert set(commands) == set(registered)
    for name, fmt in registered.items():
        assert commands[name].help.startswith(fmt.help) and f"vgpt prepare {name}" in commands[name].help


def test_every_shared_option_is_one_declaration():
    """Each shared option has the same flag, default and help in every format that takes it."""
    from vgpt_cli.data.formats import SHARED, formats

    commands = _prepare_commands(app)
    for fmt in formats():
        by_name = {p.name: p for p in commands[fmt.name].params}
        for opt in fmt.shared_taken():
            param = by_name[opt.name]
            assert (param.opts, param.default, param.help) == ([opt.cli_flag], opt.default, opt.help), fmt.name
        assert by_name["as_json"].opts == ["--json"] and by_name["as_json"].default is False
    shared = {o.name for o in SHARED}
    # what each format does not take, or takes with its own meaning: nothing else
    assert {f.name: shared - {o.name for o in f.shared_taken()} for f in formats()
            if shared - {o.name for o in f.shared_taken()}} == {"shapes": {"count", "skip_missing"}}


def test_a_registered_format_is_a_subcommand_that_prepares(tmp_path, monkeypatch):
    """A new format is a reader plus its options: registering it makes a working subcommand."""
    from vgpt_cli.commands.prepare import make_app
    from vgpt_cli.data import formats as registry
    from vgpt_cli.data.formats import DatasetFormat, Opt
    from vgpt_cli.data.source import Record, Source
    from vgpt_cli.workspace import Workspace

    def read_pictures(request, folder: Path, caption: str) -> Source:
        files = sorted(folder.glob("*.jpg"))
        splits = ["val", "test"] + ["train"] * (len(files) - 2)
        records = [Record(p.stem, [p.name], [f"{caption} {p.stem}"], s) for p, s in zip(files, splits)]
        return Source("pictures", folder, folder.resolve(), records)

    monkeypatch.setattr(registry, "_FORMATS", dict(registry._FORMATS))
    registry.register(DatasetFormat(
        name="pictures", help="Every .jpg of a folder, one made-up caption each.",
        examples=("vgpt prepare pictures photos/",), read=read_pictures,
        options=(Opt("folder", Path, "The folder.", required=True, positional=True),
                 Opt("caption", str, "The caption's first words.", "a picture of")),
    ))
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(6):
        (pictures / f"{i}.jpg").write_bytes(b"\xff\xd8\xff")
    typer_app = make_app(registry.formats())
    assert "pictures" in _prepare_commands(typer_app)
    ws = tmp_path / "ws"
    result = runner.invoke(typer_app, ["pictures", str(pictures), "--count", "3", "--json"],
                           obj={"workspace": Workspace.from_option(ws)})
    assert result.exit_code == 0, result.output
    m = Manifest.load(ws / "data" / "pictures" / "manifest.json")
    assert m.counts()["train"]["captions"] == 3 and m.splits["val"][0].captions == ["a picture of 0"]
    assert json.loads(result.stdout)["dataset"] == "pictures"
    bad = runner.invoke(typer_app, ["pictures", str(pictures), "--fraction", "2"],
                        obj={"workspace": Workspace.from_option(ws)})
    assert bad.exit_code == 2 and "--fraction" in bad.output and "Traceback" not in bad.output
