"""Issue 15, defect 7: the hostile-input corpus. Every bad file is fed to the command that reads it;
each must end with exit code 2, exactly one line on stderr that names the file, no traceback, and
the workspace (every file under the test's folder, hashed) exactly as it was."""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import gpt2_tokenizer, tree_digest
from PIL import Image
from typer.testing import CliRunner

from vgpt_cli.cli import app

LATIN1 = "café au lait, crème brûlée".encode("latin-1")  # not UTF-8: \xe9 starts no valid sequence
TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "64", "--num-workers", "0"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A real (tiny) model folder written by save_pretrained, with its preprocessor.json."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from vgpt_cli.model import Captioner, CaptionerConfig

    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=32))
    model = Captioner.from_config(CaptionerConfig(lm="tiny", d_in=8, encoder_layers=1, encoder_ffn=16), lm=lm,
                                  tokenizer=tok)
    d = tmp_path_factory.mktemp("model") / "best"
    model.save_pretrained(d)
    (d / "preprocessor.json").write_text(json.dumps({"backbone": "test_efficientnet", "fingerprint": "x",
                                                 "weights": {"kind": "random"}, "data_config": None}))
    return d


@pytest.fixture(scope="module")
def ready_ws(tmp_path_factory) -> Path:
    """A workspace with a prepared dataset and its features: what `train` needs before the LM."""
    ws = tmp_path_factory.mktemp("ready") / "ws"
    for args in (["prepare", "shapes", "--count", "10"], ["extract-features", *TINY]):
        r = CliRunner().invoke(app, ["-w", str(ws), *args])
        assert r.exit_code == 0, r.output
    return ws


# Each case: (files to create under the test folder, the vgpt arguments, the file the line must name).
# Paths are relative to the test folder; "{t}" in arguments becomes the test folder.
def _folder_csv(t: Path, body: bytes, name: str = "caps.csv") -> tuple[list[str], Path]:
    _image(t / "imgs" / "a.png")
    (t / name).write_bytes(body)
    return ["prepare", "folder", str(t / "imgs"), "--captions", str(t / name)], t / name


def _flickr(t: Path, token: bytes, train_list: bytes) -> list[str]:
    _image(t / "imgs" / "1.jpg")
    (t / "Flickr8k.token.txt").write_bytes(token)
    (t / "Flickr_8k.trainImages.txt").write_bytes(train_list)
    (t / "Flickr_8k.devImages.txt").write_bytes(b"")
    (t / "Flickr_8k.testImages.txt").write_bytes(b"")
    return ["prepare", "flickr8k", "--annotations", str(t / "Flickr8k.token.txt"), "--images", str(t / "imgs")]


def _cc_files(t: Path, txt: bytes, meta: bytes) -> list[str]:
    _image(t / "cc" / "00000" / "000000000.jpg")
    (t / "cc" / "00000" / "000000000.txt").write_bytes(txt)
    (t / "cc" / "00000" / "000000000.json").write_bytes(meta)
    return ["prepare", "cc", str(t / "cc")]


def case_csv_latin1(t):
    return _folder_csv(t, b"image,caption\na.png," + LATIN1 + b"\n")


def case_jsonl_latin1(t):
    return _folder_csv(t, b'{"image": "a.png", "caption": "' + LATIN1 + b'"}\n', "caps.jsonl")


def case_csv_field_over_128k(t):
    return _folder_csv(t, b'image,caption\na.png,"' + b"x" * (130 * 1024) + b'"\n')


def case_csv_unquoted_comma(t):
    return _folder_csv(t, b"image,caption\na.png,a dog, running on grass\n")


def case_flickr_token_latin1(t):
    return _flickr(t, b"1.jpg#0\t" + LATIN1 + b"\n", b"1.jpg\n"), t / "Flickr8k.token.txt"


def case_flickr_split_list_latin1(t):
    return _flickr(t, b"1.jpg#0\ta dog\n", b"1.jpg\n" + LATIN1 + b"\n"), t / "Flickr_8k.trainImages.txt"


def case_cc_txt_latin1(t):
    return _cc_files(t, LATIN1, b'{"url": "http://x"}'), t / "cc" / "00000" / "000000000.txt"


def case_cc_json_latin1(t):
    return _cc_files(t, b"a dog", b'{"url": "' + LATIN1 + b'"}'), t / "cc" / "00000" / "000000000.json"


def case_cc_tsv_latin1(t):
    _image(t / "imgs" / "000000000.jpg")
    (t / "cc.tsv").write_bytes(LATIN1 + b"\thttp://x\n")
    return ["prepare", "cc", "--tsv", str(t / "cc.tsv"), "--images", str(t / "imgs")], t / "cc.tsv"


def case_config_yaml_latin1(t):
    (t / "train.yaml").write_bytes(b"lr: 0.0001\n# " + LATIN1 + b"\n")
    return ["train", "--config", str(t / "train.yaml")], t / "train.yaml"


def case_workspace_json_latin1(t):
    (t / "ws").mkdir()
    (t / "ws" / "workspace.json").write_bytes(b'{"dataset": "' + LATIN1 + b'"}')
    return ["-w", str(t / "ws"), "extract-features", *TINY], t / "ws" / "workspace.json"


def case_workspace_json_list(t):
    (t / "ws").mkdir()
    (t / "ws" / "workspace.json").write_text("[]")
    return ["-w", str(t / "ws"), "extract-features", *TINY], t / "ws" / "workspace.json"


def case_downloads_json_corrupt(t):
    (t / "coco").mkdir()
    (t / "coco" / "downloads.json").write_text('{"caption_datasets.zip": {"extracted": tr')
    return ["prepare", "coco", "--root", str(t / "coco"), "--download"], t / "coco" / "downloads.json"


def case_downloads_json_list(t):
    (t / "coco").mkdir()
    (t / "coco" / "downloads.json").write_text('["caption_datasets.zip"]')
    return ["prepare", "coco", "--root", str(t / "coco"), "--download"], t / "coco" / "downloads.json"


def _predictions(t: Path, preds: str, refs: str) -> list[str]:
    (t / "preds.json").write_text(preds)
    (t / "refs.json").write_text(refs)
    return ["evaluate", "-p", str(t / "preds.json"), "-r", str(t / "refs.json"), "--no-spice"]


def case_prediction_lone_surrogate(t):
    return _predictions(t, '{"1": "a dog \\ud800 on grass"}', '{"1": ["a dog"]}'), t / "preds.json"


def case_reference_not_a_string(t):
    refs = json.dumps({"images": [{"id": 1}], "annotations": [{"id": 1, "image_id": 1, "caption": 42}]})
    return _predictions(t, '{"1": "a dog"}', refs), t / "refs.json"


def case_evaluate_output_is_a_folder(t):
    (t / "out").mkdir()
    return [*_predictions(t, '{"1": "a dog"}', '{"1": ["a dog"]}'), "-o", str(t / "out")], t / "out"


CASES: dict[str, Callable] = {name[5:]: f for name, f in list(globals().items()) if name.startswith("case_")}


def _check_one_line(result, names: Path | str, after_progress: bool = False) -> str:
    """Exit 2, no traceback, one error line naming the file. `after_progress`: commands that report
    progress before they meet the bad input (loading a model, extracting) may have printed that first."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    if after_progress:
        assert lines and sum(ln.startswith("error:") for ln in lines) == 1, result.stderr
        lines = lines[-1:]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(names) in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_file_gives_one_line_exit_2_and_leaves_the_workspace_unchanged(tmp_path, case):
    t = tmp_path / "t"
    t.mkdir()
    args, named = CASES[case](t)
    if args[0] != "-w":
        args = ["-w", str(t / "ws"), *args]
    before = tree_digest(tmp_path)
    r = CliRunner().invoke(app, args)
    _check_one_line(r, named)
    assert tree_digest(tmp_path) == before


# --- model folders: fed to `vgpt caption --model DIR` ------------------------------------------------
def _model_case(model_dir: Path, dst: Path, change: str) -> Path:
    shutil.copytree(model_dir, dst)
    cfg = dst / "config.json"
    meta = json.loads(cfg.read_text())
    if change == "config-list":
        cfg.write_text("[]")
        return cfg
    if change == "config-latin1":
        cfg.write_bytes(b'{"format": "' + LATIN1 + b'"}')
        return cfg
    if change == "unknown-model-type":
        meta["lm_config"]["model_type"] = "no-such-model"
    elif change == "heads-not-dividing":
        meta["lm_config"]["n_head"] = 5  # 32 wide
    elif change == "width-65536":
        meta["lm_config"]["n_embd"] = 65536
    elif change == "backbone-no-weights":
        (dst / "preprocessor.json").write_text(json.dumps({"backbone": "test_efficientnet", "fingerprint": "x"}))
        return dst / "preprocessor.json"
    elif change == "backbone-list":
        (dst / "preprocessor.json").write_text("[]")
        return dst / "preprocessor.json"
    cfg.write_text(json.dumps(meta))
    return cfg


@pytest.mark.parametrize("change", ["config-list", "config-latin1", "unknown-model-type", "heads-not-dividing",
                                    "width-65536", "backbone-no-weights", "backbone-list"])
def test_hostile_model_folder_gives_one_line_exit_2(model_dir, tmp_path, change):
    named = _model_case(model_dir, tmp_path / "m", change)
    img = _image(tmp_path / "img.png")
    before = tree_digest(tmp_path)
    r = CliRunner().invoke(app, ["-w", str(tmp_path / "ws"), "caption", str(img), "--model", str(tmp_path / "m"),
                                 "--device", "cpu"])
    _check_one_line(r, named, after_progress=True)  # "loading <folder> ..." comes first
    assert tree_digest(tmp_path) == before


def test_hostile_pickle_weights_in_an_lm_folder_gives_one_line_exit_2(ready_ws, tmp_path):
    from transformers import GPT2Config

    ws = tmp_path / "ws"
    shutil.copytree(ready_ws, ws)
    lm = tmp_path / "lm"
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50257, n_positions=32).save_pretrained(lm)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(Path(__file__).parent / "assets" / "gpt2-bpe" / f, lm / f)

    class RunsCode:
        def __reduce__(self):
            return (print, ("this must never run",))

    import torch

    torch.save({"transformer.wte.weight": RunsCode()}, lm / "pytorch_model.bin")
    before = tree_digest(tmp_path)
    r = CliRunner().invoke(app, ["-w", str(ws), "train", "--lm", str(lm), "--max-steps", "1", "--name", "r"])
    _check_one_line(r, lm)
    assert "this must never run" not in r.output
    assert tree_digest(tmp_path) == before


# --- a full disk: one line that says which file and how much; what is on disk stays consistent ---
def test_full_disk_during_zip_extraction_gives_one_line(tmp_path, monkeypatch):
    import zipfile

    from vgpt_cli.data import download

    root = tmp_path / "coco"
    root.mkdir()
    with zipfile.ZipFile(root / "caption_datasets.zip", "w") as zf:
        zf.writestr("dataset_coco.json", "{}" * 1000)
    real = shutil.copyfileobj

    def no_space(src, dst, length=0):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download.shutil, "copyfileobj", no_space)
    before = tree_digest(tmp_path)
    r = CliRunner().invoke(app, ["-w", str(tmp_path / "ws"), "prepare", "coco", "--root", str(root), "--download"])
    line = _check_one_line(r, root)
    assert "disk full" in line and "'dataset_coco.json'" in line and "2,000 more bytes" in line
    assert tree_digest(tmp_path) == before  # no .tmp left
    monkeypatch.setattr(download.shutil, "copyfileobj", real)


def test_full_disk_during_feature_extraction_gives_one_line_and_a_consistent_store(ready_ws, tmp_path, monkeypatch):
    from vgpt_cli.features import FeatureStore
    from vgpt_cli.features import store as store_module

    ws = tmp_path / "ws"
    shutil.copytree(ready_ws, ws)
    real = store_module.os.fdatasync

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "fdatasync", no_space)
    r = CliRunner().invoke(app, ["-w", str(ws), "extract-features", *TINY[:-2], "--image-size", "96",
                                 "--num-workers", "0"])
    line = _check_one_line(r, "data-r0.f16", after_progress=True)
    assert "disk full" in line and "bytes" in line
    monkeypatch.setattr(store_module.os, "fdatasync", real)
    new_store = Path(line.split("error: ", 1)[1].split(": disk full", 1)[0]).parent
    assert len(FeatureStore.open(new_store)) == 0  # no index line points at rows that never reached the disk
    again = CliRunner().invoke(app, ["-w", str(ws), "extract-features", *TINY[:-2], "--image-size", "96",
                                     "--num-workers", "0", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["extracted"] == 10


def test_full_disk_while_saving_a_checkpoint_gives_one_line_and_keeps_the_last_one(model_dir, tmp_path, monkeypatch):
    import safetensors.torch

    from vgpt_cli.errors import DataError
    from vgpt_cli.model import Captioner
    from vgpt_cli.train.checkpoint import save_checkpoint

    model = Captioner.from_pretrained(model_dir)
    run = tmp_path / "run"
    save_checkpoint(model, run, "last")
    before = tree_digest(tmp_path)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", no_space)
    with pytest.raises(DataError, match="disk full while saving the last checkpoint") as e:
        save_checkpoint(model, run, "last")
    assert "bytes" in str(e.value) and str(run / "last") in str(e.value) and "\n" not in str(e.value)
    assert tree_digest(tmp_path) == before  # the previous last/ bit for bit, no temporary folder left


def test_full_disk_while_writing_the_manifest_gives_one_line_and_keeps_the_old_one(tmp_path, monkeypatch):
    from vgpt_cli import workspace as ws_module

    d = tmp_path / "imgs"
    _image(d / "a.png")
    (tmp_path / "caps.csv").write_text("image,caption\na.png,a red square\n", encoding="utf-8")
    args = ["-w", str(tmp_path / "ws"), "prepare", "folder", str(d), "--captions", str(tmp_path / "caps.csv"),
            "--val-fraction", "0", "--test-fraction", "0"]
    assert CliRunner().invoke(app, args).exit_code == 0
    before = tree_digest(tmp_path)
    real = ws_module.os.fsync

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ws_module.os, "fsync", no_space)
    r = CliRunner().invoke(app, args)
    monkeypatch.setattr(ws_module.os, "fsync", real)
    line = _check_one_line(r, tmp_path / "ws" / "data" / "folder" / "manifest.json")
    assert "disk full" in line and "bytes needed" in line
    assert tree_digest(tmp_path) == before
