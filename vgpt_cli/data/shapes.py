"""The built-in procedural data set: 1-3 coloured shapes on a plain background, with grounded captions.

Each scene is rendered to a 224x224 PNG and described by several captions generated from the scene
(different templates, with or without sizes and positions). Everything is a function of (seed, index),
so one seed always gives the same images and captions. The scene's objects are kept with each image,
so that a caption can be scored against what is really there: `grounded_correct` / `grounded_score`.

The data set is written as a Karpathy-style file plus images, so every later step runs the same code
as for real data.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops, ImageDraw

from vgpt_cli.data.build import prepare_shapes
from vgpt_cli.data.formats import DatasetFormat, Opt, Request, register
from vgpt_cli.data.manifest import Manifest
from vgpt_cli.data.sampling import split_assignment
from vgpt_cli.errors import ConfigError
from vgpt_cli.files import atomic_write_json

IMAGE_SIZE = 224
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 165, 60), "blue": (40, 80, 225),
    "yellow": (240, 205, 30), "purple": (140, 60, 185), "orange": (250, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = {"small": 16, "large": 30}  # radius in pixels
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "grey": (128, 128, 128),
                                                 "black": (20, 20, 20)}
# 3x3 grid cells, row-major: name, phrase used in captions
POSITIONS = (
    ("top left", "at the top left"), ("top", "at the top"), ("top right", "at the top right"),
    ("left", "on the left"), ("centre", "in the centre"), ("right", "on the right"),
    ("bottom left", "at the bottom left"), ("bottom", "at the bottom"), ("bottom right", "at the bottom right"),
)
_PHRASE = dict(POSITIONS)
FILE_NAME = "dataset_shapes.json"
# The order in which a caption names the objects: "random" (each caption its own draw) or "reading"
# (top to bottom, left to right: the next object is determined by the one just named).
CAPTION_ORDERS = ("random", "reading")

Obj = dict[str, Any]


# --- scenes ---------------------------------------------------------------------------------
def make_scene(seed: int, index: int) -> dict[str, Any]:
    """Scene `index` of seed `seed`: background and 1-3 objects with distinct cells and (colour, shape)."""
    rng = random.Random(f"shapes-{seed}-{index}")
    n = rng.choice((1, 2, 2, 3, 3))
    cells = rng.sample(range(9), n)
    pairs: set[tuple[str, str]] = set()
    objects: list[Obj] = []
    cell_w = IMAGE_SIZE / 3
    for cell in cells:
        while True:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            if (colour, shape) not in pairs:  # one name, one object: captions stay unambiguous
                break
        pairs.add((colour, shape))
        size = rng.choice(list(SIZES))
        row, col = divmod(cell, 3)
        jitter = cell_w / 2 - SIZES[size] - 2  # stays inside its cell
        x = round((col + 0.5) * cell_w + rng.uniform(-jitter, jitter))
        y = round((row + 0.5) * cell_w + rng.uniform(-jitter, jitter))
        objects.append({"colour": colour, "shape": shape, "size": size, "position": POSITIONS[cell][0],
                        "x": x, "y": y, "r": SIZES[size]})
    return {"background": rng.choice(list(BACKGROUNDS)), "objects": objects}


def render_scene(scene: dict[str, Any]) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        x, y, r, fill = o["x"], o["y"], o["r"], COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o["shape"] == "square":
            s = r * 0.85
            draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(x, y - r), (x - r * 0.95, y + r * 0.75), (x + r * 0.95, y + r * 0.75)], fill=fill)
        elif o["shape"] == "diamond":
            draw.polygon([(x, y - r), (x + r * 0.7, y), (x, y + r), (x - r * 0.7, y)], fill=fill)
        else:  # star: 5 points, inner radius 0.45 r
            pts = []
            for k in range(10):
                rad = r if k % 2 == 0 else r * 0.45
                a = -math.pi / 2 + k * math.pi / 5
                pts.append((x + rad * math.cos(a), y + rad * math.sin(a)))
            draw.polygon(pts, fill=fill)
    return img


def object_mask(obj: Obj) -> Image.Image:
    """The pixels of one object as render_scene draws it: a mode "L" image, 255 on the object, 0 elsewhere."""
    img = render_scene({"background": "black", "objects": [obj]})
    bg = Image.new("RGB", img.size, BACKGROUNDS["black"])
    return ImageChops.difference(img, bg).convert("L").point(lambda v: 255 if v else 0)


# --- captions -------------------------------------------------------------------------------
def _np(o: Obj, with_size: bool) -> str:
    words = f"{o['size']} {o['colour']} {o['shape']}" if with_size else f"{o['colour']} {o['shape']}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_captions(scene: dict[str, Any], seed: int, index: int, n: int = 5, order: str = "random") -> list[str]:
    """`n` differently phrased captions, each naming every object's colour and shape, in `order`
    (CAPTION_ORDERS; a caption relating two objects keeps its own order: "a to the left of b")."""
    if order not in CAPTION_ORDERS:
        raise ValueError(f"caption order {order!r}: use one of {', '.join(CAPTION_ORDERS)}")
    rng = random.Random(f"captions-{seed}-{index}")
    objs = list(scene["objects"])
    bg = scene["background"]
    k = len(objs)
    cell = {name: i for i, (name, _) in enumerate(POSITIONS)}

    def ordered() -> list[Obj]:
        shuffled = rng.sample(objs, k)  # drawn in both orders, so that the other choices stay the same
        return sorted(objs, key=lambda o: cell[o["position"]]) if order == "reading" else shuffled

    def nps(sizes: bool) -> list[str]:
        return [_np(o, sizes) for o in ordered()]

    def with_positions() -> str:
        named = ordered()
        if k == 3:  # positions for all three would run past 20 words
            first = f"{_np(named[0], False)} {_PHRASE[named[0]['position']]}"
            return f"there is {first} with {_join([_np(o, False) for o in named[1:]])}"
        sizes = rng.random() < 0.5
        return "there is " + _join([f"{_np(o, sizes)} {_PHRASE[o['position']]}" for o in named])

    def relation() -> str | None:
        a, b = rng.sample(objs, 2)
        (ra, ca), (rb, cb) = (divmod([p for p, _ in POSITIONS].index(o["position"]), 3) for o in (a, b))
        if ca != cb:
            a, b = (a, b) if ca < cb else (b, a)
            return f"{_np(a, False)} to the left of {_np(b, False)}"
        a, b = (a, b) if ra < rb else (b, a)
        return f"{_np(a, False)} above {_np(b, False)}"

    templates: list[Callable[[], str | None]] = [
        lambda: f"{_join(nps(k < 3 and rng.random() < 0.5))} on a {bg} background",
        with_positions,
        lambda: f"a {bg} background with {_join(nps(k < 3 and rng.random() < 0.5))}",
        lambda: f"an image of {_join(nps(False))}",
        lambda: _join(nps(True)) if k < 3 else _join(nps(False)),
        lambda: f"{_join(nps(False))} against a {bg} background",
    ]
    if k == 2:
        templates.append(relation)
    rng.shuffle(templates)
    out: list[str] = []
    for t in templates:
        c = t()
        if c and c not in out:
            out.append(c)
        if len(out) == n:
            break
    return out


# --- grounded accuracy ----------------------------------------------------------------------
_WORD = re.compile(r"[a-z]+")
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}


def mentioned_objects(caption: str) -> set[tuple[str, str]]:
    """(colour, shape) pairs a caption names: a colour word before a shape word, sizes allowed between."""
    words = _WORD.findall(caption.lower())
    pairs = set()
    for j, w in enumerate(words):
        if w not in _SHAPE_WORDS:
            continue
        i = j - 1
        while i >= 0 and words[i] in SIZES:
            i -= 1
        if i >= 0 and words[i] in COLOURS:
            pairs.add((words[i], _SHAPE_WORDS[w]))
    return pairs


def grounded_correct(caption: str, objects: list[dict]) -> bool:
    """True when the caption names every object's colour and shape, and no pair that is not in the scene."""
    return mentioned_objects(caption) == {(o["colour"], o["shape"]) for o in objects}


def grounded_score(captions: dict[str, str], objects: dict[str, list[dict]]) -> float:
    """The fraction of captions (by id) that are grounded_correct against their scene's objects."""
    if not captions:
        raise ValueError("grounded_score: no captions to score")
    missing = [i for i in captions if i not in objects]
    if missing:
        raise KeyError(f"grounded_score: no scene objects for id(s) {missing[:5]}")
    return sum(grounded_correct(c, objects[i]) for i, c in captions.items()) / len(captions)


def naming_words(caption: str, objects: list[dict]) -> list[tuple[int, Obj]]:
    """(index into caption.split(), object) for each shape word that names an object of the scene: with
    the colour word before it (sizes allowed between), as mentioned_objects reads a caption."""
    words = [(k, w) for k, raw in enumerate(caption.split()) for w in _WORD.findall(raw.lower())]
    by_pair = {(o["colour"], o["shape"]): o for o in objects}
    out = []
    for j, (k, w) in enumerate(words):
        if w not in _SHAPE_WORDS:
            continue
        i = j - 1
        while i >= 0 and words[i][1] in SIZES:
            i -= 1
        obj = by_pair.get((words[i][1], _SHAPE_WORDS[w])) if i >= 0 else None
        if obj is not None:
            out.append((k, obj))
    return out


def mentioned_shapes(caption: str) -> set[str]:
    return {_SHAPE_WORDS[w] for w in _WORD.findall(caption.lower()) if w in _SHAPE_WORDS}


def _micro_f1(pairs: list[tuple[set, set]]) -> float:
    tp = sum(len(said & true) for said, true in pairs)
    said_n, true_n = sum(len(s) for s, _ in pairs), sum(len(t) for _, t in pairs)
    return 2 * tp / (said_n + true_n) if said_n + true_n else 0.0


def object_scores(captions: dict[str, str], objects: dict[str, list[dict]]) -> dict[str, float]:
    """Partial credit where grounded_score gives none, micro-averaged over all captions:
    object_f1 over the (colour, shape) pairs named vs those in the scene, shape_f1 over the shapes
    alone (colour ignored). Both 1.0 for perfectly grounded captions."""
    score = grounded_score(captions, objects)  # also validates the ids
    obj = [(mentioned_objects(c), {(o["colour"], o["shape"]) for o in objects[i]}) for i, c in captions.items()]
    shp = [(mentioned_shapes(c), {o["shape"] for o in objects[i]}) for i, c in captions.items()]
    return {"grounded": score, "object_f1": _micro_f1(obj), "shape_f1": _micro_f1(shp)}


# --- the data set on disk -------------------------------------------------------------------
def write_shapes(root: Path, count: int, seed: int,
                 on_progress: Callable[[int], None] | None = None, caption_order: str = "random") -> Path:
    """Render `count` scenes to root/images/*.png and write root/dataset_shapes.json (Karpathy style),
    the captions naming objects in `caption_order` (CAPTION_ORDERS).

    Split: a seeded, exact 80/10/10 of the scenes.
    """
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    splits = split_assignment(count, 0.1, 0.1, seed)
    entries = []
    sentid = 0
    for i in range(count):
        scene = make_scene(seed, i)
        filename = f"shapes_{i:06d}.png"
        render_scene(scene).save(images / filename, compress_level=1)
        sentences = []
        for c in scene_captions(scene, seed, i, order=caption_order):
            sentences.append({"raw": c, "tokens": _WORD.findall(c), "imgid": i, "sentid": sentid})
            sentid += 1
        entries.append({"filepath": "images", "filename": filename, "imgid": i, "split": splits[i],
                        "sentids": [s["sentid"] for s in sentences], "sentences": sentences,
                        "background": scene["background"], "objects": scene["objects"]})
        if on_progress:
            on_progress(1)
    path = root / FILE_NAME
    atomic_write_json(path, {"dataset": "shapes", "seed": seed, "count": count, "caption_order": caption_order,
                             "images": entries})
    return path


def _build(request: Request, count: int, root: Path | None) -> tuple[Manifest, Path]:
    if count < 10:
        raise ConfigError(f"--count {count}: need at least 10 scenes for an 80/10/10 split")
    with request.progress("scenes") as bar:
        task = bar.add_task("rendering scenes", total=count)
        return prepare_shapes(request.workspace, count, request.sampling.seed, request.sampling,
                              name=request.name, root=root, on_progress=lambda n: bar.advance(task, n))


register(DatasetFormat(
    name="shapes",
    help="Built-in demo data: 1-3 coloured shapes per 224x224 PNG, 5 grounded captions per scene.",
    details="Deterministic by --seed. Here --count is the number of scenes; --fraction then samples the\n"
    "training pool as for any other format.",
    examples=("vgpt prepare shapes", "vgpt prepare shapes --count 500 --seed 1 --name shapes-small"),
    build=_build,
    options=(
        Opt("count", int, "How many scenes to generate (split 80/10/10 by --seed).", 2000),
        Opt("root", Path, "Where to write the images and dataset_shapes.json (default: <workspace>/sources/<name>)."),
    ),
    without=("skip_missing",),  # the scenes are rendered here: none can be missing
))
