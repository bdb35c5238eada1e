"""`vgpt evaluate --split`: a shapes workspace (prepare, extract-features with a tiny random backbone),
a tiny random captioner as the run's best model, then the decoded split, its files and its scores."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from vgpt_cli.cli import app
from vgpt_cli.data.manifest import Manifest
from vgpt_cli.data.shapes import grounded_score, object_scores
from vgpt_cli.decode import DecodeOptions, decode_arrays
from vgpt_cli.evaluate.metrics import compute_metrics
from vgpt_cli.features import open_workspace_store
from vgpt_cli.files import atomic_write_json
from vgpt_cli.model import Captioner, CaptionerConfig
from vgpt_cli.workspace import Workspace

TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "64", "--num-workers", "0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards (see conftest.py)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tok) -> Workspace:
    root = tmp_path_factory.mktemp("ws")
    r = cli("-w", str(root), "prepare", "shapes", "--count", "40", "--test-size", "3")
    assert r.exit_code == 0, r.output
    r = cli("-w", str(root), "extract-features", *TINY)
    assert r.exit_code == 0, r.output
    ws = Workspace(root)
    store = open_workspace_store(ws)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=32,
                                    tie_word_embeddings=False))
    model = Captioner.from_config(CaptionerConfig(lm="tiny-gpt2", d_in=store.dim, encoder_layers=1, encoder_ffn=32),
                                  lm=lm, tokenizer=tok).eval()
    best = ws.run_dir("r1") / "best"
    model.save_pretrained(best)
    atomic_write_json(best / "preprocessor.json", store.meta)
    ws.set_current(run="r1")
    return ws


@pytest.mark.slow
def test_evaluate_test_split_writes_predictions_and_scores(ws):
    r = cli("-w", str(ws.root), "evaluate", "--split", "test", "--beam-size", "2", "--max-length", "8",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    out = ws.run_dir("r1") / "eval" / "test"
    metrics = json.loads((out / "metrics.json").read_text())
    preds = json.loads((out / "predictions.json").read_text())
    per_image = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]

    manifest = Manifest.load(ws.manifest_path("shapes"))
    items = manifest.items("test")
    assert len(items) == 3 and metrics["n_items"] == 3
    # the cut test split is said everywhere: the table, stderr, metrics.json
    assert any("TEST SPLIT CUT" in n for n in metrics["notes"])
    assert "TEST SPLIT CUT" in r.stdout and "TEST SPLIT CUT" in r.stderr

    # predictions: COCO results format, one per test item, equal to decoding the store directly
    assert [p["image_id"] for p in preds] == [int(i.id) if i.id.isdigit() else i.id for i in items]
    store = open_workspace_store(ws)
    model = Captioner.from_pretrained(ws.run_dir("r1") / "best")
    with torch.inference_mode():
        want = decode_arrays(model, [store.get(i.id) for i in items], DecodeOptions(beam_size=2, max_length=8))
    captions = {i.id: h.text for i, h in zip(items, want)}
    assert [p["caption"] for p in preds] == list(captions.values())
    assert [p["caption"] for p in per_image] == list(captions.values())
    assert all(p["references"] == i.captions for p, i in zip(per_image, items))
    # captions that reach the token limit without their end are scored as they are, and said to be cut
    cut = sum(not h.ended for h in want)
    assert cut > 0 and [p["ended"] for p in per_image] == [h.ended for h in want]
    note = f"{cut} of 3 captions reached the 8-token limit without ending"
    assert any(n.startswith(note) for n in metrics["notes"]) and note in r.stderr

    # scores: the metrics of those captions (METEOR aside, recomputed here without its JVM start)
    direct = compute_metrics(captions, {i.id: i.captions for i in items}, skip=("METEOR",), log=lambda m: None)
    for k, v in direct.scores.items():
        assert metrics["scores"][k] == v, k
    objects = {i.id: i.extra["objects"] for i in items}
    assert metrics["scores"]["grounded"] == grounded_score(captions, objects)
    assert {k: metrics["scores"][k] for k in ("grounded", "object_f1", "shape_f1")} == object_scores(captions, objects)
    assert "SPICE" in metrics["skipped"] or "SPICE" in metrics["scores"]
    assert "Bleu_4" in r.stdout and "grounded" in r.stdout
    # where the words that name an object look: the demo's measure, now any shapes evaluation's
    from vgpt_cli.evaluate.grounding import grid_preprocess, shapes_attention

    assert metrics["attention"] == shapes_attention(model, grid_preprocess(store.meta), store, items, captions)
    assert set(metrics["attention"]) >= {"object_words", "attention_peak_in_object", "attention_peak_chance"}

    # the written predictions file, scored again against the workspace's split: the same numbers
    again = cli("-w", str(ws.root), "evaluate", "-p", str(out / "predictions.json"), "--split", "test", "--json")
    assert again.exit_code == 0, again.output
    rescored = json.loads(again.stdout)["predictions.json"]
    assert rescored["scores"] == {k: v for k, v in metrics["scores"].items()
                                  if k not in ("grounded", "object_f1", "shape_f1", "attention_peak_in_object",
                                               "attention_peak_chance")}
    assert any("TEST SPLIT CUT" in n for n in rescored["notes"]) and "TEST SPLIT CUT" in again.stderr


def test_evaluate_errors_are_one_line(ws, tmp_path):
    r = cli("-w", str(ws.root), "evaluate", "--split", "val", "--model", str(tmp_path / "nope"))
    assert r.exit_code == 2 and "--model" in r.output and "Traceback" not in r.output
    empty = cli("-w", str(tmp_path), "evaluate", "--split", "test")
    assert empty.exit_code == 2 and "vgpt prepare" in empty.output
    r = cli("-w", str(ws.root), "evaluate", "--references", "x.json")
    assert r.exit_code == 2 and "--predictions" in r.output


@pytest.mark.slow
def test_evaluate_int8_against_fp32_reports_the_agreement_beside_fp32s_outputs(ws):
    fp32 = cli("-w", str(ws.root), "evaluate", "--split", "test", "--beam-size", "2", "--max-length", "8",
               "--device", "cpu", "--no-spice", "--json")
    assert fp32.exit_code == 0, fp32.output
    r = cli("-w", str(ws.root), "evaluate", "--split", "test", "--beam-size", "2", "--max-length", "8",
            "--device", "cpu", "--no-spice", "--precision", "int8", "--compare-fp32", "--json")
    assert r.exit_code == 0, r.output
    res, base = json.loads(r.stdout), json.loads(fp32.stdout)
    assert res["precision"] == "int8" and res["out_dir"].endswith("test-int8")  # fp32's files stay as they were
    a = res["agreement"]
    # the fp32 side of the comparison is the plain fp32 evaluation
    assert a["scores"]["fp32"]["CIDEr"] == base["scores"]["CIDEr"]
    assert a["scores"]["int8"]["CIDEr"] == res["scores"]["CIDEr"]
    # identical: recomputed from the two predictions files
    out = ws.run_dir("r1") / "eval"
    p8 = {p["image_id"]: p["caption"] for p in json.loads((out / "test-int8" / "predictions.json").read_text())}
    p32 = {p["image_id"]: p["caption"] for p in json.loads((out / "test" / "predictions.json").read_text())}
    assert set(p8) == set(p32) and a["images"] == len(p32) == 3
    assert a["identical"] == sum(p8[k] == p32[k] for k in p32) / 3
    assert (a["worst"] is None) == (p8 == p32)
    plain = cli("-w", str(ws.root), "evaluate", "--split", "test", "--compare-fp32")
    assert plain.exit_code == 2 and "--precision" in plain.output and "Traceback" not in plain.output
