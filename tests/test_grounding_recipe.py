"""What the grounding recipe claims (docs/research/grounding.md), on tiny GPT-2 captioners.

- At step 0 the captioner is close to the pretrained LM alone (gates start linguistic, K = 1).
- With tau 0.2 and gates starting at sigmoid(5), no gradient reaches the cross-attention or the visual
  encoder; the soft-gate first phase (tau 0) opens that path from the first step.
- A frozen-LM first phase leaves the LM untouched and then trains it.
- Images with several captions in a batch are encoded once, with the same loss as one row per caption.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from vgpt_cli.model import Captioner, CaptionerConfig
from vgpt_cli.train import TrainConfig, train
from vgpt_cli.train.data import Example, collate, epoch_order, image_groups

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D_IN = 16


def captioner(tok, tau: float = 0.2, bias: float | None = 5.0, seed: int = 0) -> tuple[Captioner, GPT2LMHeadModel]:
    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    reference = GPT2LMHeadModel(lm.config).eval()
    reference.load_state_dict(lm.state_dict())
    cfg = CaptionerConfig(lm="tiny-gpt2", d_in=D_IN, encoder_layers=1, encoder_ffn=32, encoder_dropout=0.0,
                          cross_attn_dropout=0.0, tau=tau, gate_init_bias=bias)
    torch.manual_seed(seed + 1)
    return Captioner.from_config(cfg, lm=lm, tokenizer=tok).eval(), reference


def batch(tok, model: Captioner, n_images: int = 3):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(n_images, 5, D_IN, generator=gen)
    caps = ["a red square and a blue circle", "a green star", "an image of a yellow diamond"][:n_images]
    t = model.tokenize(caps)
    return feats, torch.full((n_images,), 5), t


def test_step_zero_is_close_to_the_pretrained_lm(tok):
    model, lm = captioner(tok)
    feats, lengths, t = batch(tok, model)
    with torch.no_grad():
        ours = model(feats, lengths, t["input_ids"], t["attention_mask"]).logits
        theirs = lm(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    real = t["attention_mask"].bool()
    diff = (ours - theirs).abs()[real]
    # g = sigmoid(5) = 0.9933 scales each block's residual stream: a small, bounded change, far below
    # the spread of the LM's own logits (which the authors' random gate init does not keep).
    assert float(diff.max()) < 0.05 * float(theirs[real].std())
    authors, _ = captioner(tok, bias=None)
    with torch.no_grad():
        far = (authors(feats, lengths, t["input_ids"], t["attention_mask"]).logits - theirs).abs()[real]
    assert float(far.max()) > 10 * float(diff.max())


def _grad_norms(model: Captioner, tok) -> tuple[float, float]:
    feats, lengths, t = batch(tok, model)
    model.zero_grad(set_to_none=True)
    model(feats, lengths, t["input_ids"], t["attention_mask"], labels=t["labels"]).loss.backward()

    def norm(module) -> float:
        return float(sum(p.grad.pow(2).sum() for p in module.parameters() if p.grad is not None) ** 0.5)

    return norm(model.xattn), norm(model.encoder)


def test_soft_gate_phase_opens_the_gradient_path_at_step_zero(tok):
    model, _ = captioner(tok)
    assert _grad_norms(model, tok) == (0.0, 0.0)  # tau 0.2, 1 - g = 0.0067: the visual branch is cut
    model.tau_override = 0.0  # what TrainConfig.soft_gate_steps does during the first steps
    xattn, encoder = _grad_norms(model, tok)
    assert xattn > 0 and encoder > 0
    for name, p in model.xattn.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_images_with_several_captions_are_encoded_once(tok):
    model, _ = captioner(tok, bias=None)

    class Store:
        arrays = {f"i{k}": torch.randn(4 + k, D_IN, generator=torch.Generator().manual_seed(k)).half().numpy()
                  for k in range(3)}

        def get(self, key):
            return self.arrays[key]

    caps = ["a red square", "a square that is red", "a blue circle", "a green star", "one blue circle"]
    ids = ["i0", "i0", "i1", "i2", "i1"]
    examples = [Example(i, c) for i, c in zip(ids, caps)]
    grouped = collate(Store(), model, examples, 20)
    assert grouped.features.shape[0] == 3 and grouped.image_index.tolist() == [0, 0, 1, 2, 1]
    one_each = collate(Store(), model, [examples[i] for i in (0, 2, 3)], 20)
    assert one_each.image_index is None  # no repeated image: one row per caption, as before
    with torch.no_grad():
        loss = model(grouped.features, grouped.lengths, grouped.input_ids, grouped.attention_mask,
                     labels=grouped.labels, image_index=grouped.image_index).loss
        feats = grouped.features[grouped.image_index]
        lengths = grouped.lengths[grouped.image_index]
        expected = model(feats, lengths, grouped.input_ids, grouped.attention_mask, labels=grouped.labels).loss
    assert abs(float(loss) - float(expected)) < 1e-6


def test_grouped_epoch_order_keeps_each_image_together():
    examples = [Example(f"i{k}", f"c{j}") for k in range(7) for j in range(1 + k % 3)]
    groups = image_groups(examples)
    order = epoch_order(len(examples), 3, 0, groups)
    assert sorted(order) == list(range(len(examples)))
    runs = [examples[i].item_id for i in order]
    collapsed = [x for j, x in enumerate(runs) if j == 0 or runs[j - 1] != x]
    assert len(collapsed) == len(groups)  # every image's captions are consecutive
    assert order == epoch_order(len(examples), 3, 0, groups)  # a pure function of (seed, epoch)
    assert order != epoch_order(len(examples), 3, 1, groups)


def test_frozen_lm_phase_then_the_lm_trains(tmp_path):
    from test_train import make_workspace, tiny_captioner

    ws = make_workspace(tmp_path)
    model = tiny_captioner()
    lm0 = {k: v.detach().clone() for k, v in model.lm.state_dict().items()}
    new0 = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    seen = {}

    def snapshot(record):
        seen[record["step"]] = {k: v.detach().clone() for k, v in model.lm.state_dict().items()}

    cfg = TrainConfig(lm="gpt2", device="cpu", lr=1e-3, batch_size=8, max_steps=3, patience=100, log_every=1,
                      freeze_lm_steps=2, soft_gate_steps=1, name="frozen")
    train(cfg, ws, model=model, on_step=snapshot, quiet=True)
    for step in (1, 2):
        assert all(torch.equal(seen[step][k], lm0[k]) for k in lm0), step
    assert any(not torch.equal(seen[3][k], lm0[k]) for k in lm0)
    assert any(not torch.equal(v, new0[k]) for k, v in model.encoder.state_dict().items())
    assert model.tau_override is None and all(p.requires_grad for p in model.lm.parameters())
