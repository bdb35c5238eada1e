"""Decoding settings saved with a model (issue 12): written by training, read back by evaluate and
the decoders, checked on load. Tiny random GPT-2 captioners (see test_train.py).

Each defect test is named for the defect it pins down and fails on the code before its fix.
"""

from __future__ import annotations

import json

import pytest
from test_train import make_workspace, quick, tiny_captioner

from vgpt_cli.model import Captioner
from vgpt_cli.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards (see conftest.py)


def ws_items(ws, split: str):
    from vgpt_cli.evaluate.report import workspace_manifest

    return workspace_manifest(ws).items(split)


# --- 4. decoding settings saved with the model -------------------------------------------------------------
@pytest.mark.slow
def test_training_saves_its_decoding_settings_and_evaluate_uses_them(tmp_path):
    from vgpt_cli.evaluate.report import evaluate_split

    ws = make_workspace(tmp_path, n_train=4, caps_per_item=1, n_val=2)
    result = train(quick(max_steps=1, val_beam=2, max_length=7, rerank=20, name="g"), ws, model=tiny_captioner(),
                   quiet=True)
    saved = json.loads((result.run_dir / "best" / "generation_config.json").read_text())
    assert saved == {"beam_size": 2, "max_length": 7, "min_length": 0, "length_penalty": 0.0, "no_repeat_ngram_size": 0,
                     "rerank": 20, "rerank_samples": 0}
    # the caption bank consensus reranking reads: every training image's captions, in the folder
    bank = Captioner.from_pretrained(result.run_dir / "best").caption_bank
    assert sorted(map(tuple, bank.captions)) == sorted(tuple(it.captions) for it in ws_items(ws, "train"))
    assert "generation" not in json.loads((result.run_dir / "best" / "config.json").read_text())
    assert Captioner.from_pretrained(result.run_dir / "best").generation == saved
    ev = evaluate_split(ws, "val", device="cpu", spice=False, log=lambda s: None)
    assert (ev.decode["beam_size"], ev.decode["max_length"], ev.decode["rerank"]) == (2, 7, 20)
    ev = evaluate_split(ws, "val", beam_size=1, device="cpu", spice=False, log=lambda s: None)
    assert (ev.decode["beam_size"], ev.decode["max_length"]) == (1, 7)  # a flag overrides one setting


def test_every_decoding_setting_round_trips_through_generation_config_json(tmp_path):
    from dataclasses import asdict, fields

    from vgpt_cli.decode import DecodeOptions
    from vgpt_cli.model_folders import decode_options

    defaults = DecodeOptions()
    # every field away from its default, so that a field dropped on the way fails
    chosen = DecodeOptions(beam_size=3, max_length=11, min_length=2, length_penalty=0.7, no_repeat_ngram_size=3,
                           rerank=7, rerank_samples=4)
    assert all(getattr(chosen, f.name) != getattr(defaults, f.name) for f in fields(DecodeOptions))
    model = tiny_captioner()
    model.generation = asdict(chosen)
    d = model.save_pretrained(tmp_path / "m")
    assert json.loads((d / "generation_config.json").read_text()) == asdict(chosen)
    assert decode_options(Captioner.from_pretrained(d)) == chosen
    (d / "generation_config.json").write_text('{"beam_size": 3, "temperature": 0.5}')
    from vgpt_cli.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"generation_config.json: not valid decoding settings .*temperature"):
        Captioner.from_pretrained(d)


def test_a_bad_generation_block_is_one_line_naming_config_json(tmp_path):
    from vgpt_cli.errors import ModelLoadError

    d = tiny_captioner().save_pretrained(tmp_path / "m")
    meta = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(meta, generation={"beam_size": "five"})))
    with pytest.raises(ModelLoadError, match=r"config.json: not a valid vgpt captioner config .*beam_size"):
        Captioner.from_pretrained(d)


def test_decoding_settings_default_to_the_models_then_the_decoders():
    from vgpt_cli.decode import DecodeOptions
    from vgpt_cli.model_folders import decode_options

    model = tiny_captioner()
    assert decode_options(model) == DecodeOptions()
    model.generation = {"beam_size": 3, "max_length": 9}
    assert (decode_options(model).beam_size, decode_options(model).max_length) == (3, 9)
    assert decode_options(model, beam_size=1, max_length=None).beam_size == 1
