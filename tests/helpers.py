"""Builders shared by several test files: `from helpers import gpt2_tokenizer` (pytest puts tests/ on
sys.path; so does running a test file as a script, as the torchrun workers of test_train_ddp.py do)."""

from __future__ import annotations

import json
from pathlib import Path

GPT2_BPE = Path(__file__).parent / "assets" / "gpt2-bpe"


def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer (50,257 tokens) from the files in tests/assets/gpt2-bpe."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast(vocab=str(GPT2_BPE / "vocab.json"), merges=str(GPT2_BPE / "merges.txt"))
    assert len(tok) > 50000  # the empty-tokenizer trap of transformers 5 (see offline-assets.md)
    return tok


def tree_digest(root) -> dict[str, str]:
    """{relative path: sha256} of every file under root (folders as "dir"): equal before and after
    means nothing under root was written, removed or added."""
    import hashlib

    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() and not p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


CHELSEA = Path(__file__).resolve().parent.parent / "vgpt_cli" / "assets" / "chelsea.jpg"
PHOTO_CAPTIONS = {  # scikit-image's sample photographs (plus the packaged chelsea.jpg) and a caption each
    "chelsea": "a cat sitting on a wooden floor",
    "astronaut": "a woman in a space suit next to a flag",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket standing on a launch pad",
}


def tiny_photo_model(folder, image_size: int = 224, steps: int = 80, seed: int = 0) -> Path:
    """A tiny captioner TRAINED (teacher forcing, Adam) to caption four real photographs, saved with
    save_pretrained with its preprocessor.json as `vgpt train` leaves a model: a random-weight timm
    backbone (test_efficientnet, 7 x 7 tokens at 224 px), a 2-layer 32-wide GPT-2 with the real BPE.
    About 10 s on one CPU thread; afterwards chelsea.jpg is captioned "a cat sitting on a wooden floor"."""
    import numpy as np
    import skimage.data
    import torch
    from PIL import Image
    from transformers import GPT2Config, GPT2LMHeadModel

    from vgpt_cli.decode import pad_features
    from vgpt_cli.features import load_backbone
    from vgpt_cli.model import Captioner, CaptionerConfig

    folder = Path(folder)
    backbone = load_backbone("test_efficientnet", pretrained=False, image_size=image_size)
    images = [Image.open(CHELSEA).convert("RGB")] + [
        Image.fromarray(getattr(skimage.data, k)()).convert("RGB") for k in list(PHOTO_CAPTIONS)[1:]]
    arrays = backbone.features_for_images(images)
    feats, lengths = pad_features([a.astype(np.float32) for a in arrays])
    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64))
    cfg = CaptionerConfig(lm="tiny-gpt2", d_in=backbone.dim, encoder_layers=1, encoder_ffn=64)
    model = Captioner.from_config(cfg, lm=lm, tokenizer=gpt2_tokenizer())
    batch = model.tokenize(list(PHOTO_CAPTIONS.values()))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(feats, lengths, batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.preprocessor = backbone.meta  # what training records: the feature store's record
    model.save_pretrained(folder)
    return folder


def poison_encoder_at(model, step: int):
    """An on_step hook that fills the model's first encoder weight with NaN after `step`: the next
    step's loss is NaN (for the tests of how a run that goes non-finite ends)."""
    import torch

    def hook(record) -> None:
        if record["step"] == step:
            with torch.no_grad():
                next(model.encoder.parameters()).fill_(float("nan"))

    return hook


def tiny_lm(vocab: int, family: str = "gpt2", positions: int = 64, tie: bool | None = None):
    """A random 2-layer, 64-wide GPT-2 or Llama (GQA: 4 heads, 2 key/value heads) over `vocab` tokens;
    tie=None keeps the family's default for tied input/output embeddings. The caller seeds torch."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tied = {} if tie is None else {"tie_word_embeddings": tie}
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=positions,
                                          **tied))
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=96, vocab_size=vocab,
                                        max_position_embeddings=positions, **tied))


# --- killing a training run, reading what it logged ------------------------------------------------------
class Killed(Exception):
    """Raised from on_step: the run stops as if killed right after that step's checkpoint (if any)."""


def kill_at(phase: str, step: int):
    """An on_step hook that raises Killed at that step of that phase ("xe" or "scst")."""
    def hook(record):
        if record["phase"] == phase and record["step"] == step:
            raise Killed
    return hook


def metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_line(text: str) -> str:
    return " ".join(text.split())


# write_coco's default split sizes: every Karpathy split, restval joining train's pool (50 images)
COCO_SPLIT_SIZES = {"train": 30, "restval": 20, "val": 8, "test": 6}


def write_coco(root: Path, sizes: dict[str, int] | None = None, captions: int = 5,
               real_images: bool = False) -> Path:
    """A small dataset_coco.json exactly as Karpathy's caption_datasets.zip has it, plus its image files:
    a JPEG's first three bytes (where only existence is checked), or with real_images a small real JPEG
    of one seeded colour. sizes: images per split (default COCO_SPLIT_SIZES)."""
    sizes = sizes or COCO_SPLIT_SIZES
    import random

    rng = random.Random(0)
    splits = [split for split, n in sizes.items() for _ in range(n)]  # one entry per image, in file order

    def image(imgid: int, split: str) -> dict:
        cocoid = 100000 + imgid * 7
        folder = "train2014" if split == "train" else "val2014"  # restval's images are val2014's
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        (root / folder).mkdir(parents=True, exist_ok=True)
        if real_images:
            from PIL import Image

            Image.new("RGB", (64, 48), tuple(rng.randrange(256) for _ in range(3))).save(root / folder / filename)
        else:
            (root / folder / filename).write_bytes(b"\xff\xd8\xff")
        raws = [f"A  Man riding wave number {k} on image {imgid}.\n" for k in range(captions)]
        sentids = [imgid * captions + k for k in range(captions)]
        return {"filepath": folder, "filename": filename, "imgid": imgid, "split": split, "cocoid": cocoid,
                "sentids": sentids, "sentences": [{"tokens": raw.lower().split(), "raw": raw, "imgid": imgid,
                                                   "sentid": sid} for raw, sid in zip(raws, sentids)]}

    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": [image(i, split) for i, split in enumerate(splits)], "dataset": "coco"}))
    return path
