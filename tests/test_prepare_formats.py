"""flickr8k, flickr30k, folder, iu-xray and cc, each on fixture files in the format's public layout."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vgpt_cli.cli import app
from vgpt_cli.data.build import SamplingOptions, build_manifest
from vgpt_cli.data.cc import read_cc_tsv
from vgpt_cli.data.flickr import read_flickr
from vgpt_cli.data.iu_xray import read_iu_xray
from vgpt_cli.data.manifest import Manifest
from vgpt_cli.text import normalize_caption

runner = CliRunner()


def prepare(ws: Path, *args: str):
    return runner.invoke(app, ["-w", str(ws), "prepare", *args])


def load(ws: Path, name: str) -> Manifest:
    return Manifest.load(ws / "data" / name / "manifest.json")


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff")


# --- Flickr -------------------------------------------------------------------------------------
def write_karpathy_flickr(root: Path, fmt: str, folder: str, splits: list[str]) -> None:
    images = []
    for i, split in enumerate(splits):
        filename = f"{1000268201 + i}_693b08cb0e.jpg"
        touch(root / folder / filename)
        sents = [{"tokens": ["a", "child"], "raw": f"A child {k} in image {i} .", "imgid": i, "sentid": 5 * i + k}
                 for k in range(5)]
        images.append({"sentids": [s["sentid"] for s in sents], "imgid": i, "sentences": sents, "split": split,
                       "filename": filename})
    (root / f"dataset_{fmt}.json").write_text(json.dumps({"images": images, "dataset": fmt}))


@pytest.mark.parametrize(("fmt", "folder"), [("flickr8k", "Flicker8k_Dataset"), ("flickr30k", "flickr30k-images")])
def test_flickr_karpathy(tmp_path, fmt, folder):
    root = tmp_path / fmt
    write_karpathy_flickr(root, fmt, folder, ["train"] * 10 + ["val"] * 3 + ["test"] * 4)
    result = prepare(tmp_path / "ws", fmt, "--root", str(root), "--count", "12")
    assert result.exit_code == 0, result.output
    m = load(tmp_path / "ws", fmt)
    assert m.counts()["train"]["captions"] == 12 and len(m.splits["val"]) == 3 and len(m.splits["test"]) == 4
    item = m.splits["val"][0]
    assert item.id == "1000268211_693b08cb0e"
    assert item.images == [str((root / folder / "1000268211_693b08cb0e.jpg").resolve())]
    assert item.captions[0] == "a child 0 in image 10 ."


def write_flickr8k_release(root: Path, n: dict[str, int], bogus: bool = True) -> None:
    lines, lists = [], {"train": [], "dev": [], "test": []}
    i = 0
    for split, count in n.items():
        for _ in range(count):
            image = f"{3000000000 + i}_abc{i:04x}.jpg"
            lists[split].append(image)
            touch(root / "Flicker8k_Dataset" / image)
            lines += [f"{image}#{k}\tA dog number {k} runs .  " for k in range(5)]
            i += 1
    if bogus:  # the real file has this key, which is in no split list
        lines.append("2258277193_586949ec62.jpg.1#0\tA bogus caption .")
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for split, images in lists.items():
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(images) + "\n")


def test_flickr8k_original_release(tmp_path):
    root = tmp_path / "f8k"
    write_flickr8k_release(root, {"train": 12, "dev": 3, "test": 2})
    result = prepare(tmp_path / "ws", "flickr8k", "--root", str(root), "--fraction", "0.5", "--unit", "image")
    assert result.exit_code == 0, result.output
    m = load(tmp_path / "ws", "flickr8k")
    assert {s: c["items"] for s, c in m.counts().items()} == {"train": 6, "val": 3, "test": 2}
    assert m.counts()["train"]["captions"] == 30
    assert m.splits["val"][0].captions == [f"a dog number {k} runs ." for k in range(5)]
    assert any("2258277193_586949ec62.jpg.1" in n for n in m.notes)
    assert m.source["path"].endswith("Flickr8k.token.txt")


def test_flickr8k_bad_token_line_names_the_line(tmp_path):
    root = tmp_path / "f8k"
    write_flickr8k_release(root, {"train": 2, "dev": 1, "test": 1}, bogus=False)
    with open(root / "Flickr8k.token.txt", "a") as f:
        f.write("no tab here\n")
    result = prepare(tmp_path / "ws", "flickr8k", "--root", str(root))
    assert result.exit_code == 2 and "Flickr8k.token.txt: line 21" in result.output
    assert not (tmp_path / "ws" / "data").exists()


def test_flickr8k_real_token_file(realdata, tmp_path):
    """Real token-file lines (the first 1,000 of the 40,460, plus the known bogus key's 5), with split
    lists cut from its own keys (the real lists are not stored)."""
    token = realdata / "flickr8k" / "Flickr8k.token.excerpt.txt"
    keys = list(dict.fromkeys(line.split("#")[0] for line in token.read_text().splitlines() if line))
    real = [k for k in keys if k.endswith(".jpg")]
    assert len(keys) == 201 and len(real) == 200
    lists = tmp_path / "lists"
    lists.mkdir()
    for name, part in (("train", real[:150]), ("dev", real[150:175]), ("test", real[175:])):
        (lists / f"Flickr_8k.{name}Images.txt").write_text("\n".join(part) + "\n")
    images = tmp_path / "Flicker8k_Dataset"
    present = real[::2]  # every other image "downloaded": --skip-missing drops the rest
    for k in present:
        touch(images / k)
    source = read_flickr("flickr8k", tmp_path, token, images, lists)
    assert len(source.records) == 200 and sum(len(r.captions) for r in source.records) == 1000
    m = build_manifest(source, "flickr8k", SamplingOptions(fraction=0.1, skip_missing=True))
    pool = [k for k in present if k in set(real[:150])]
    assert m.counts()["train"]["captions"] == round(0.1 * len(pool) * 5)
    assert len(m.splits["val"]) == len([k for k in present if k in set(real[150:175])])
    assert {i.id for i in m.splits["test"]} == {k[:-4] for k in present if k in set(real[175:])}
    assert any("2258277193_586949ec62.jpg.1" in n for n in m.notes)


# --- folder -------------------------------------------------------------------------------------
def test_folder_csv_with_split_column_and_several_captions(tmp_path):
    photos = tmp_path / "photos"
    rows = []
    for i in range(8):
        touch(photos / "pets" / f"{i}.jpg")
        split = "train" if i < 5 else "validation" if i < 7 else "test"
        rows += [{"image": f"pets/{i}.jpg", "caption": f"Pet {i}, first", "split": split},
                 {"image": f"pets/{i}.jpg", "caption": f"pet {i} second", "split": split}]
    with open(photos / "captions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "caption", "split"])
        w.writeheader()
        w.writerows(rows)
    result = prepare(tmp_path / "ws", "folder", str(photos), "--captions", str(photos / "captions.csv"),
                     "--name", "pets")
    assert result.exit_code == 0, result.output
    m = load(tmp_path / "ws", "pets")
    assert {s: len(v) for s, v in m.splits.items()} == {"train": 5, "val": 2, "test": 1}
    assert m.splits["train"][0].captions == ["pet 0, first", "pet 0 second"]
    assert m.splits["val"][0].images == [str((photos / "pets" / "5.jpg").resolve())]


def test_folder_jsonl_seeded_split(tmp_path):
    photos = tmp_path / "photos"
    with open(photos.parent / "caps.jsonl", "w") as f:
        for i in range(40):
            touch(photos / f"{i:03d}.png")
            f.write(json.dumps({"image": f"{i:03d}.png", "captions": [f"photo {i}", f"image {i}"]}) + "\n")
    args = [str(photos), "--captions", str(photos.parent / "caps.jsonl"), "--val-fraction", "0.2",
            "--test-fraction", "0.1"]
    assert prepare(tmp_path / "ws", "folder", *args).exit_code == 0
    m = load(tmp_path / "ws", "folder")
    assert {s: len(v) for s, v in m.splits.items()} == {"train": 28, "val": 8, "test": 4}
    assert prepare(tmp_path / "ws2", "folder", *args, "--seed", "9").exit_code == 0
    assert {i.id for i in load(tmp_path / "ws2", "folder").splits["val"]} != {i.id for i in m.splits["val"]}


@pytest.mark.parametrize(("content", "expect"), [
    ("img,text\na.jpg,x\n", "must have columns 'image' and 'caption'"),
    ("image,caption,split\na.jpg,x,train\na.jpg,y,test\n", "line 3: image a.jpg has split 'test'"),
    ("image,caption,split\na.jpg,x,holdout\n", "line 2: split 'holdout'"),
])
def test_folder_bad_captions_file(tmp_path, content, expect):
    touch(tmp_path / "p" / "a.jpg")
    (tmp_path / "c.csv").write_text(content)
    result = prepare(tmp_path / "ws", "folder", str(tmp_path / "p"), "--captions", str(tmp_path / "c.csv"))
    assert result.exit_code == 2 and "c.csv" in result.output and expect in result.output, result.output
    assert not (tmp_path / "ws" / "data").exists()


# --- IU X-ray -----------------------------------------------------------------------------------
def write_iu(root: Path, n: dict[str, int], test_key: str = "test") -> Path:
    raw: dict[str, list] = {}
    i = 0
    for split, count in n.items():
        key = test_key if split == "test" else split
        raw[key] = []
        for _ in range(count):
            sid = f"CXR{1000 + i}_IM-{i:04d}"
            paths = [f"{sid}/0.png", f"{sid}/1.png"]
            for p in paths:
                touch(root / "images" / p)
            raw[key].append({"id": sid, "report": f"The heart size is normal.  No effusion {i}.",
                             "image_path": paths, "split": split})
            i += 1
    path = root / "annotation.json"
    path.write_text(json.dumps(raw))
    return path


def test_iu_xray_with_the_four_space_test_key(tmp_path):
    ann = write_iu(tmp_path / "iu", {"train": 10, "val": 3, "test": 4}, test_key="    ")
    result = prepare(tmp_path / "ws", "iu-xray", "--annotations", str(ann))
    assert result.exit_code == 0, result.output
    m = load(tmp_path / "ws", "iu-xray")
    assert {s: len(v) for s, v in m.splits.items()} == {"train": 10, "val": 3, "test": 4}
    item = m.splits["test"][0]
    assert len(item.images) == 2 and item.images[1].endswith("/images/CXR1013_IM-0013/1.png")
    assert item.captions == ["the heart size is normal. no effusion 13."]
    assert any("'    '" in n and "own \"split\" field" in n for n in m.notes)


def test_iu_xray_real_annotation_file(realdata, tmp_path):
    ann = realdata / "iu_xray_r2gen" / "annotation.excerpt.json"  # 20 / 5 / 8 studies of the real file
    raw = json.loads(ann.read_text())
    images = tmp_path / "images"
    present = {}  # every other study "downloaded"; --skip-missing drops the rest
    for recs in raw.values():
        for r in recs[::2]:
            present[r["id"]] = r["split"]
            for p in r["image_path"]:
                touch(images / p)
    source = read_iu_xray(ann, images)
    assert Counter(r.split for r in source.records) == {"train": 20, "val": 5, "test": 8}
    m = build_manifest(source, "iu-xray", SamplingOptions(skip_missing=True))
    assert {s: {i.id for i in v} for s, v in m.splits.items()} == {
        s: {i for i, sp in present.items() if sp == s} for s in ("train", "val", "test")}
    assert all(len(i.images) == 2 and len(i.captions) == 1 for i in m.all_items())
    assert any("8 record(s) under the key '    '" in n for n in m.notes)


# --- Conceptual Captions ------------------------------------------------------------------------
def test_cc_img2dataset_files_layout(tmp_path):
    out = tmp_path / "cc"
    for i in range(25):
        shard = out / f"{i // 10:05d}"
        key = f"{i:09d}"
        touch(shard / f"{key}.jpg")
        (shard / f"{key}.txt").write_text(f"Actor  {i} attends the premiere")
        (shard / f"{key}.json").write_text(json.dumps({"url": f"http://x/{i}.jpg", "key": key, "status": "success",
                                                        "caption": f"Actor {i}"}))
    result = prepare(tmp_path / "ws", "cc", str(out), "--val-fraction", "0.2", "--test-fraction", "0.2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"]["val"]["items"] == 5
    m = load(tmp_path / "ws", "cc")
    item = next(i for i in m.all_items() if i.id == "000000012")
    assert item.captions == ["actor 12 attends the premiere"] and item.extra["url"] == "http://x/12.jpg"
    assert item.images == [str((out / "00001" / "000000012.jpg").resolve())]


def test_cc_release_tsv_with_partly_downloaded_images(realdata, tmp_path):
    tsv = realdata / "cc3m_validation" / "Validation_GCC-1.1.0-Validation.head2000.tsv"  # 2,000 of 15,833 lines
    images = tmp_path / "imgs"
    for i in range(0, 2000, 50):  # only every 50th image "downloaded", in img2dataset's shard layout
        touch(images / f"{i // 10000:05d}" / f"{i:09d}.jpg")
    result = prepare(tmp_path / "ws", "cc", "--tsv", str(tsv), "--images", str(images))
    assert result.exit_code == 2 and "are absent" in result.output and "--skip-missing" in result.output
    source = read_cc_tsv(tsv, images, 0.1, 0.1, 42)
    assert len(source.records) == 2000
    m = build_manifest(source, "cc", SamplingOptions(skip_missing=True))
    assert len(m.all_items()) == 40
    first = next(i for i in m.all_items() if i.id == "000000000")
    line0 = tsv.read_text().splitlines()[0].split("\t")
    assert first.captions == [normalize_caption(line0[0])] and first.extra["url"] == line0[1]
