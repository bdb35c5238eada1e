"""`vgpt caption` and the notebook API on real photographs, with a tiny random captioner saved by
Captioner.save_pretrained and a tiny random timm backbone."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from vgpt_cli.api import load_captioner
from vgpt_cli.cli import app
from vgpt_cli.data.manifest import Item
from vgpt_cli.decode import DecodeOptions, decode, pad_features
from vgpt_cli.errors import ModelLoadError
from vgpt_cli.files import atomic_write_json
from vgpt_cli.model import Captioner, CaptionerConfig
from vgpt_cli.workspace import Workspace

skimage = pytest.importorskip("skimage")
SKIMAGE = Path(skimage.__file__).parent / "data"
PHOTOS = [SKIMAGE / n for n in ("astronaut.png", "chelsea.png", "coffee.png", "camera.png")]  # camera: grey


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards (see conftest.py)


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    extra = []
    try:
        import matplotlib

        hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if hopper.is_file():
            extra.append(hopper)
    except ImportError:
        pass
    return [p for p in PHOTOS if p.is_file()] + extra


@pytest.fixture(scope="module")
def backbone():
    from vgpt_cli.features import load_backbone

    return load_backbone("test_efficientnet", pretrained=False, image_size=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok, backbone) -> Path:
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=32,
                                    tie_word_embeddings=False))
    cfg = CaptionerConfig(lm="tiny-gpt2", d_in=backbone.dim, encoder_layers=2, encoder_ffn=32)
    model = Captioner.from_config(cfg, lm=lm, tokenizer=tok).eval()
    for g in model.gates:
        torch.nn.init.normal_(g.weight, std=0.3)
    d = tmp_path_factory.mktemp("run") / "best"
    model.preprocessor = backbone.meta  # what training records: the feature store's record
    model.save_pretrained(d)
    return d


def run(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.slow
def test_caption_real_photographs_same_path_as_extraction(photos, model_dir, backbone, tmp_path):
    r = run("caption", *map(str, photos), "--model", str(model_dir), "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert [g["image"] for g in got] == [str(p) for p in photos]
    assert all(isinstance(g["caption"], str) and g["caption"].strip() for g in got)

    # independent path: features written by extraction into a store, decoded from the store
    from vgpt_cli.features import FeatureStore, extract_items

    items = [Item(f"i{k}", [str(p)], ["x"]) for k, p in enumerate(photos)]
    extract_items(items, backbone, tmp_path / "store", num_workers=0, progress=False)
    store = FeatureStore.open(tmp_path / "store")
    model = Captioner.from_pretrained(model_dir)
    f, lengths = pad_features([store.get(it.id) for it in items])
    with torch.inference_mode():
        want = [h.text for h in decode(model, f, lengths, DecodeOptions(beam_size=5, max_length=20))]
    assert [g["caption"] for g in got] == want

    # the table form: one row per image, on stdout
    table = run("caption", str(photos[0]), "--model", str(model_dir), "--device", "cpu", "--beam-size", "1")
    assert table.exit_code == 0 and "astronaut.png" in table.stdout


def test_corrupt_file_among_good_ones_is_a_partial_run(photos, model_dir, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(photos[1], folder / "cat.png")
    r = run("caption", str(photos[0]), str(bad), str(folder), str(tmp_path / "nope" / "*.jpg"),
            "--model", str(model_dir), "--device", "cpu", "--jsonl", "--beam-size", "2")
    assert r.exit_code == 3, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    by_image = {Path(x["image"]).name: x for x in rows}
    assert by_image["astronaut.png"]["caption"] and by_image["cat.png"]["caption"]
    assert by_image["broken.jpg"]["caption"] is None and by_image["broken.jpg"]["error"]
    assert by_image["*.jpg"]["error"] == "the pattern matches no file"
    assert "failed:" in r.stderr and "broken.jpg" in r.stderr and "Traceback" not in r.output
    only_bad = run("caption", str(bad), "--model", str(model_dir), "--device", "cpu")
    assert only_bad.exit_code == 2 and "broken.jpg" in only_bad.output


def test_gates_table_and_plot(photos, model_dir, tmp_path):
    png = tmp_path / "gates.png"
    r = run("caption", str(photos[1]), "--model", str(model_dir), "--device", "cpu", "--gates",
            "--gates-plot", str(png), "--beam-size", "2", "--max-length", "6")
    assert r.exit_code == 0, r.output
    assert "linguistic" in r.stdout and "visual" in r.stdout
    with Image.open(png) as im:
        assert im.size[0] > 100
    j = run("caption", str(photos[1]), "--model", str(model_dir), "--device", "cpu", "--gates", "--json",
            "--beam-size", "2", "--max-length", "6")
    tokens = json.loads(j.stdout)[0]["tokens"]
    assert 1 <= len(tokens) <= 6
    assert json.loads(j.stdout)[0]["cut"] == (tokens[-1]["token"] != "<eos>")  # cut: no end within 6 tokens
    assert all(0 <= t["linguistic"] <= 1 and 0 <= t["visual"] <= 1 for t in tokens)


def test_api_two_lines_and_backbone_fallback(photos, model_dir, backbone, tmp_path):
    cap = load_captioner(model_dir, device="cpu", beam_size=2)
    with Image.open(photos[0]) as im:
        texts = cap([str(photos[0]), im.copy()])
    assert len(texts) == 2 and texts[0] == texts[1]  # a path and the same PIL image give one caption

    # no preprocessor.json: the workspace's feature store record is used; with neither, a clear error
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "preprocessor.json").unlink()
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(ModelLoadError, match="preprocessor.json"):
        load_captioner(bare, workspace=ws, device="cpu")
    store_dir = ws.features_root / backbone.fingerprint
    from vgpt_cli.features import extract_items

    extract_items([Item("a", [str(photos[0])], ["x"])], backbone, store_dir, num_workers=0, progress=False)
    ws.set_current(features=backbone.fingerprint)
    assert load_captioner(bare, workspace=ws, device="cpu", beam_size=2)(str(photos[0])) == [texts[0]]


def test_missing_model_is_one_line(photos, tmp_path):
    r = run("-w", str(tmp_path), "caption", str(photos[0]))
    assert r.exit_code == 2 and "vgpt train" in r.output and "Traceback" not in r.output


def test_python_api_doc_example_runs(tmp_path, monkeypatch, capsys):
    """The runnable example of docs/python-api.md, executed as written (from a repository-like folder)."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "python-api.md").read_text()
    block = doc.split("## A runnable example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "tests").symlink_to(Path(__file__).resolve().parent)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/python-api.md", "exec"), {"__name__": "docs_example"})
    printed = capsys.readouterr().out.splitlines()
    captions = ast.literal_eval(printed[0])  # the list the example prints
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert printed[-1].startswith("missing.jpg None file not found")


@pytest.mark.slow
def test_caption_with_no_flags_decodes_with_the_settings_saved_in_the_model_folder(photos, model_dir, backbone,
                                                                                   tmp_path):
    """The model folder's generation_config.json (what training validated and selected the model with; an
    older folder's config.json "generation" block) is what `vgpt caption` decodes with when no flag says otherwise."""
    chosen = {"beam_size": 2, "max_length": 4, "min_length": 2, "length_penalty": 0.0}
    saved, older = tmp_path / "best", tmp_path / "older"
    shutil.copytree(model_dir, saved)
    atomic_write_json(saved / "generation_config.json", chosen)
    shutil.copytree(model_dir, older)
    (older / "generation_config.json").unlink()
    meta = json.loads((older / "config.json").read_text())
    meta["generation"] = chosen
    atomic_write_json(older / "config.json", meta)

    r = run("caption", *map(str, photos), "--model", str(saved), "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    r = run("caption", *map(str, photos), "--model", str(older), "--device", "cpu", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == got, r.output
    model = Captioner.from_pretrained(saved)
    f, lengths = pad_features(backbone.features_for_images([str(p) for p in photos]))

    def reference(options: DecodeOptions, n: int = len(photos)) -> list[tuple[str, float]]:
        with torch.inference_mode():
            return [(h.text, h.score) for h in decode(model, f[:n], lengths[:n], options)]

    want = reference(DecodeOptions(beam_size=2, max_length=4, min_length=2))
    assert [(g["caption"], pytest.approx(g["score"], abs=1e-4)) for g in got] == [
        (t, pytest.approx(s, abs=1e-4)) for t, s in want]
    assert want[:1] != reference(DecodeOptions(), 1)  # the built-in defaults give another caption: it can fail
    with torch.inference_mode():
        ended = [h.ended for h in decode(model, f, lengths, DecodeOptions(beam_size=2, max_length=4, min_length=2))]
    assert [g["cut"] for g in got] == [not e for e in ended]  # a caption that reached the limit says so
    cut_line = f"{ended.count(False)} of {len(photos)} captions reached the 4-token limit without ending"
    assert (cut_line in " ".join(r.stderr.split())) == (False in ended)
    assert "beam 2, at most 4 tokens" in " ".join(r.stderr.split())
    # a flag overrides the saved value, and only that one
    r = run("caption", str(photos[0]), "--model", str(saved), "--device", "cpu", "--json", "--beam-size", "1")
    with torch.inference_mode():
        greedy = decode(model, f[:1], lengths[:1], DecodeOptions(beam_size=1, max_length=4, min_length=2))[0].text
    assert json.loads(r.stdout)[0]["caption"] == greedy
    # the Python API does the same
    assert load_captioner(saved, device="cpu").options == DecodeOptions(beam_size=2, max_length=4, min_length=2)


@pytest.mark.slow
def test_a_model_folder_copied_alone_captions_in_a_fresh_process_as_in_its_workspace(photos, model_dir, tmp_path):
    """The folder is the whole artifact: weights, config.json, generation_config.json, preprocessor.json and
    the tokenizer. Copied alone into an empty folder, run from another empty folder (no workspace),
    offline, in a new Python process, it gives the captions it gives here."""
    import os
    import subprocess
    import sys

    here = json.loads(run("caption", *map(str, photos), "--model", str(model_dir), "--device", "cpu",
                          "--json").stdout)
    alone = tmp_path / "copied" / "model"
    shutil.copytree(model_dir, alone)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "VGPT_WORKSPACE"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one thread, as here: the same float sums
    proc = subprocess.run([sys.executable, "-m", "vgpt_cli", "caption", *map(str, photos), "--model", str(alone),
                           "--device", "cpu", "--json"], cwd=empty, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    there = json.loads(proc.stdout)
    assert [(r["caption"], r["score"]) for r in there] == [(r["caption"], r["score"]) for r in here]
    assert len({r["caption"] for r in here}) >= 1 and not list(empty.iterdir())  # nothing written there
    assert {p.name for p in alone.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                                 "preprocessor.json", "tokenizer.json"}


def test_an_older_model_folder_loads_as_before_and_says_so_once(photos, model_dir, backbone, tmp_path):
    """The older layout (the backbone record as backbone.json) captions exactly as the current one, with one
    note naming the folder; saved again, it has the current layout and no note."""
    now = load_captioner(model_dir, device="cpu", beam_size=2)
    assert now.notes == [] and now.model.preprocessor == json.loads(json.dumps(backbone.meta))
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    (old / "preprocessor.json").rename(old / "backbone.json")
    then = load_captioner(old, device="cpu", beam_size=2)
    assert then(list(map(str, photos))) == now(list(map(str, photos)))
    assert len(then.notes) == 1 and str(old) in then.notes[0] and "older model folder" in then.notes[0]
    r = run("caption", str(photos[0]), "--model", str(old), "--device", "cpu")
    assert r.exit_code == 0 and r.stderr.count("older model folder") == 1
    then.model.save_pretrained(old)
    assert (old / "preprocessor.json").is_file() and not (old / "backbone.json").exists()
    assert load_captioner(old, device="cpu").notes == []
