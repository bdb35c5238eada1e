"""Flickr8k and Flickr30k: Karpathy's split files, and Flickr8k's original release.

Original Flickr8k release (Hodosh et al. 2013):

    Flickr8k.token.txt              <image>.jpg#<0-4><TAB><caption>
    Flickr_8k.trainImages.txt       one image file name per line (6,000)
    Flickr_8k.devImages.txt         (1,000) -> our val split
    Flickr_8k.testImages.txt        (1,000)
    Flicker8k_Dataset/              the images (the folder name is misspelt in the release)

Token lines whose image is in no split list (e.g. the known bogus key `2258277193_586949ec62.jpg.1`)
are left out, with a note.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from vgpt_cli.data.formats import DatasetFormat, Opt, Request, register
from vgpt_cli.data.karpathy import read_karpathy
from vgpt_cli.data.source import Record, Source, read_text, require_file, sha256_file, utf8_text
from vgpt_cli.errors import DataError

KARPATHY_NAME = {"flickr8k": "dataset_flickr8k.json", "flickr30k": "dataset_flickr30k.json"}
IMAGE_FOLDER = {"flickr8k": "Flicker8k_Dataset", "flickr30k": "flickr30k-images"}
TOKEN_NAME = "Flickr8k.token.txt"
SPLIT_LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
_TOKEN_LINE = re.compile(r"^(?P<image>[^\t#]+)#(?P<n>\d+)\t(?P<caption>.*)$")


def default_root(workspace_root: Path, fmt: str) -> Path:
    return Path(workspace_root) / "sources" / fmt


def read_flickr(fmt: str, root: Path, annotations: Path | None = None, images: Path | None = None,
                splits_dir: Path | None = None) -> Source:
    """Karpathy's dataset_flickr*.json, or (flickr8k) the original token file + split lists."""
    root = Path(root)
    image_root = Path(images) if images else root / IMAGE_FOLDER[fmt]
    if annotations is None:
        annotations = root / KARPATHY_NAME[fmt]
        if fmt == "flickr8k" and not annotations.exists() and (root / TOKEN_NAME).exists():
            annotations = root / TOKEN_NAME
    how = (f"get {KARPATHY_NAME[fmt]} from Karpathy's caption_datasets.zip "
           "(https://cs.stanford.edu/people/karpathy/deepimagesent/)"
           + (f" or {TOKEN_NAME} from the Flickr8k text release" if fmt == "flickr8k" else "")
           + f", put it in {root} or pass --annotations FILE")
    require_file(Path(annotations), "annotation file", how)
    if not image_root.is_dir():
        raise DataError(f"{image_root}: image folder not found; put the {fmt} images there "
                        f"(the release's {IMAGE_FOLDER[fmt]}/ folder) or pass --images DIR")
    if Path(annotations).suffix == ".txt":
        if fmt != "flickr8k":
            raise DataError(f"{annotations}: the original text release is read for flickr8k only; "
                            f"pass {KARPATHY_NAME[fmt]} for {fmt}")
        return read_flickr8k_tokens(Path(annotations), image_root.resolve(), splits_dir)
    return read_karpathy(Path(annotations), image_root.resolve(), fmt)


def read_flickr8k_tokens(token_file: Path, image_root: Path, splits_dir: Path | None = None) -> Source:
    splits_dir = Path(splits_dir) if splits_dir else token_file.parent
    split_of: dict[str, str] = {}
    for split, name in SPLIT_LISTS.items():
        path = require_file(splits_dir / name, "Flickr8k split list",
                            "it comes with Flickr8k.token.txt in the Flickr8k text release; "
                            "pass --splits-dir DIR if it is elsewhere")
        for line in read_text(path).splitlines():
            image = line.strip()
            if not image:
                continue
            if image in split_of and split_of[image] != split:
                raise DataError(f"{path}: image {image} is also in the {split_of[image]} list; "
                                "an image belongs to one split")
            split_of[image] = split
    captions: dict[str, list[str]] = {}
    with open(token_file, encoding="utf-8") as f, utf8_text(token_file):
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            m = _TOKEN_LINE.match(line)
            if not m:
                raise DataError(f"{token_file}: line {lineno}: expected '<image>.jpg#<n><TAB><caption>', "
                                f"got {line[:60]!r}")
            captions.setdefault(m["image"], []).append(m["caption"])
    notes = []
    unlisted = [im for im in captions if im not in split_of]
    if unlisted:
        notes.append(f"{len(unlisted)} image key(s) of {token_file.name} are in no split list and were left "
                     f"out: {', '.join(unlisted[:3])}")
    uncaptioned = [im for im in split_of if im not in captions]
    if uncaptioned:
        notes.append(f"{len(uncaptioned)} image(s) of the split lists have no caption and were left out: "
                     f"{', '.join(uncaptioned[:3])}")
    records = [Record(PurePosixPath(im).stem, [im], caps, split_of[im], {}, f"image {im}")
               for im, caps in captions.items() if im in split_of]
    return Source("flickr8k", token_file, image_root, records, sha256=sha256_file(token_file), notes=notes,
                  extra={"splits_dir": str(splits_dir.resolve())})


def _reader(fmt: str):
    def read(request: Request, root: Path | None, annotations: Path | None, images: Path | None,
             splits_dir: Path | None = None) -> Source:
        root = Path(root) if root else default_root(request.workspace.root, fmt)
        return read_flickr(fmt, root, annotations, images, splits_dir)

    return read


_IMAGES = Opt("images", Path, "The image root folder.")

register(DatasetFormat(
    name="flickr8k",
    help="Flickr8k: Karpathy's split file, or the original release (token file + split lists).",
    examples=("vgpt prepare flickr8k --root /data/flickr8k --fraction 0.01",
              "vgpt prepare flickr8k --annotations Flickr8k.token.txt --images Flicker8k_Dataset --count 500"),
    read=_reader("flickr8k"),
    options=(
        Opt("root", Path, "Folder with the annotation file and Flicker8k_Dataset/ "
            "(default: <workspace>/sources/flickr8k)."),
        Opt("annotations", Path, "Karpathy's dataset_flickr8k.json, or the release's Flickr8k.token.txt "
            "(default: whichever is in --root)."),
        _IMAGES,
        Opt("splits_dir", Path, "Folder with Flickr_8k.{train,dev,test}Images.txt (default: beside the token file)."),
    ),
))

register(DatasetFormat(
    name="flickr30k",
    help="Flickr30k with Karpathy's splits.",
    examples=("vgpt prepare flickr30k --root /data/flickr30k --fraction 0.01",),
    read=_reader("flickr30k"),
    options=(
        Opt("root", Path, "Folder with dataset_flickr30k.json and flickr30k-images/ "
            "(default: <workspace>/sources/flickr30k)."),
        Opt("annotations", Path, "Karpathy's dataset_flickr30k.json (default: <root>/dataset_flickr30k.json)."),
        _IMAGES,
    ),
))
