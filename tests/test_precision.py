"""Narrower weights for captioning (vgpt_cli.model.precision): int8 and bf16 against the fp32 model they
come from, the pieces int8 swaps in against what they replace, and the refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import CHELSEA, PHOTO_CAPTIONS, gpt2_tokenizer, tiny_lm, tiny_photo_model
from typer.testing import CliRunner

from vgpt_cli.cli import app
from vgpt_cli.errors import ConfigError
from vgpt_cli.model import Captioner, CaptionerConfig
from vgpt_cli.model import precision as precision_mod
from vgpt_cli.model.precision import QuantizedLevelGates, check_precision, narrow_model
from vgpt_cli.model.srau import LevelGates

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards (see conftest.py)


@pytest.fixture(scope="module")
def photo_model(tmp_path_factory):
    return tiny_photo_model(tmp_path_factory.mktemp("photo-model"))


def photos():
    import skimage.data
    from PIL import Image

    return [Image.open(CHELSEA).convert("RGB")] + [
        Image.fromarray(getattr(skimage.data, k)()).convert("RGB") for k in list(PHOTO_CAPTIONS)[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp16", "bf16"])
def test_narrow_weights_caption_the_trained_photos_as_fp32_does(photo_model, precision):
    from vgpt_cli.api import load_captioner

    fp32 = load_captioner(photo_model, device="cpu")
    narrow = load_captioner(photo_model, device="cpu", precision=precision)
    assert narrow.model.precision == precision
    images = photos()
    # trained to a clear margin on these photos (chelsea.jpg: its own caption): every caption must survive
    assert fp32(images)[0] == PHOTO_CAPTIONS["chelsea"]
    assert narrow(images) == fp32(images)
    # and the scores move little: int8 rounds weights to 1/127 of a row's range, bf16 to 3 digits
    s32 = [r.score for r in fp32.caption(images)]
    s = [r.score for r in narrow.caption(images)]
    assert s == pytest.approx(s32, rel=0.05, abs=0.05)
    assert s != s32  # the weights really are narrower


def test_int8_quantizes_every_decoder_linear_and_not_the_encoder(photo_model):
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    model = narrow_model(Captioner.from_pretrained(photo_model), "int8")
    decoder = [model.lm, model.xattn, model.gates]
    assert not any(isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
                   for part in decoder for m in part.modules())
    assert sum(isinstance(m, QLinear) for part in decoder for m in part.modules()) > 10
    assert isinstance(model.lm.lm_head, QLinear)
    assert any(isinstance(m, torch.nn.Linear) for m in model.encoder.modules())  # runs once per image: fp32


def test_gpt2_conv1d_swap_computes_the_transformers_model_exactly():
    torch.manual_seed(0)
    lm = tiny_lm(300).eval()
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        before = lm(ids).logits
        precision_mod.conv1d_as_linear(lm)
        after = lm(ids).logits
    assert type(lm.transformer.h[0].attn.c_attn) is torch.nn.Linear
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_int8_gates_match_the_fp32_gates_they_replace():
    torch.manual_seed(0)
    gates = LevelGates(3, 32)
    torch.nn.init.normal_(gates.weight, std=0.1)
    torch.nn.init.normal_(gates.bias, std=0.5)
    q = QuantizedLevelGates(gates)
    a, c = torch.randn(2, 5, 32), torch.randn(2, 3, 5, 32)
    with torch.no_grad():
        ref = gates(a, c)
        got = q(a, c)
        x = torch.randn(3, 10, 64)
        ref_level, got_level = gates.level_logits(x), q.level_logits(x)
    assert q.levels == 3
    assert (got - ref).abs().max() < 0.02            # after the sigmoid
    assert (got_level - ref_level).abs().max() < 0.1  # logits of size ~3
    assert (got_level - ref_level).abs().max() > 0    # and really quantized


@pytest.mark.parametrize("levels", [1, 3])
def test_int8_fused_decoding_equals_the_unfused_modules(tok, levels):
    from vgpt_cli.decode import DecodeOptions, beam_search

    torch.manual_seed(1)
    cfg = CaptionerConfig(lm="tiny", d_in=16, encoder_layers=levels, gate_init_bias=None)
    model = narrow_model(Captioner.from_config(cfg, lm=tiny_lm(len(tok)), tokenizer=tok), "int8")
    feats, lengths = torch.randn(3, 6, 16), torch.tensor([6, 4, 5])
    opts = DecodeOptions(beam_size=3, max_length=8)
    with torch.inference_mode():
        fused = beam_search(model, feats, lengths, opts)
        model.fused_inference = False
        plain = beam_search(model, feats, lengths, opts)
    assert [h[0].token_ids for h in fused] == [h[0].token_ids for h in plain]
    assert [h[0].score for h in fused] == pytest.approx([h[0].score for h in plain], abs=1e-4)


def test_llama_family_narrows_too():
    from vgpt_cli.decode import DecodeOptions, beam_search

    tok = gpt2_tokenizer()
    torch.manual_seed(2)
    cfg = CaptionerConfig(lm="tiny-llama", d_in=16, encoder_layers=1)
    fp32 = Captioner.from_config(cfg, lm=tiny_lm(len(tok), family="llama"), tokenizer=tok).eval()
    feats, lengths = torch.randn(2, 5, 16), torch.tensor([5, 3])
    opts = DecodeOptions(beam_size=2, max_length=6)
    with torch.inference_mode():
        ref = fp32(feats, lengths, torch.tensor([[1, 2, 3]] * 2)).logits
        for precision in ("int8", "bf16"):
            model = narrow_model(copy.deepcopy(fp32), precision)
            logits = model(feats, lengths, torch.tensor([[1, 2, 3]] * 2)).logits.float()
            assert (logits - ref).abs().max() < 0.05 * ref.abs().max()
            hyps = beam_search(model, feats, lengths, opts)
            assert all(len(h[0].token_ids) >= 1 for h in hyps)


def test_precisions_are_refused_or_noted_in_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="use one of fp32, bf16, fp16, int8"):
        check_precision("fp8", "cpu")
    with pytest.raises(ConfigError, match="CPU only") as e:
        check_precision("int8", "cuda")
    assert "\n" not in str(e.value)
    assert check_precision("int8", "cpu") is None and check_precision("fp32", "cpu") is None
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: {"avx2"})
    note = check_precision("bf16", "cpu")
    assert "no bf16 units" in note and "\n" not in note
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert check_precision("bf16", "cpu") is None
    assert check_precision("bf16", "cuda") is None


def test_caption_command_with_int8_and_its_refusals(photo_model, tmp_path):
    run = CliRunner().invoke
    args = ["-w", str(tmp_path), "caption", str(CHELSEA), "--model", str(photo_model), "--device", "cpu", "--json"]
    fp32 = run(app, args)
    int8 = run(app, [*args, "--precision", "int8"])
    assert fp32.exit_code == 0 and int8.exit_code == 0, int8.output
    caption = json.loads(int8.stdout)[0]["caption"]
    assert caption == json.loads(fp32.stdout)[0]["caption"] == PHOTO_CAPTIONS["chelsea"]
    bad = run(app, [*args, "--precision", "fp8"])
    assert bad.exit_code != 0 and "--precision fp8: use one of fp32, bf16, fp16, int8" in bad.output
    assert "Traceback" not in bad.output
