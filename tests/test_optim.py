"""Results the training loop must give (issue 12): learning-rate schedules and warm-up, parameter
groups, gradient clipping, bf16 on the CPU. Tiny random GPT-2 captioners (see test_train.py).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from test_train import make_workspace, quick, tiny_captioner

from vgpt_cli.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards (see conftest.py)


# --- 8. results the loop must give -------------------------------------------------------------------------------
def test_lr_schedules_and_warmup_give_the_expected_rates(tmp_path):
    import math

    from vgpt_cli.train.optim import lr_factor

    # warm-up 2 then linear decay to 0 over 6 steps; the rate each step used, as logged
    ws = make_workspace(tmp_path, n_train=4, caps_per_item=2)
    result = train(quick(batch_size=2, max_steps=6, warmup=2, schedule="linear", lr=1e-3, name="s"), ws,
                   model=tiny_captioner(), quiet=True)
    got = [r["lr"] / 1e-3 for r in result.history]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25], abs=1e-12)
    cosine = lr_factor("cosine", 2, 6)
    assert [cosine(s) for s in range(6)] == pytest.approx(
        [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)], abs=1e-12)
    assert [lr_factor("constant", 3, 6)(s) for s in range(6)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])
    assert [lr_factor("linear", 0, 4)(s) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_parameter_groups_lm_rate_and_no_decay_on_norms_and_biases():
    from vgpt_cli.train.optim import make_optimizer

    model = tiny_captioner()
    opt = make_optimizer(model, lr=1e-3, lm_lr=1e-5, weight_decay=0.01)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(group_of) == len(names)  # every trainable parameter, once
    for name, p in names.items():
        g = group_of[id(p)]
        assert g["lr"] == (1e-5 if name.startswith("lm.") else 1e-3), name
        is_norm_or_bias = re.search(r"[._]bias$", name) or re.search(r"\.(ln_\w+|norm\d*)\.weight$", name)
        assert g["weight_decay"] == (0.0 if is_norm_or_bias else 0.01), name
    assert any(n.startswith("lm.") and ".ln_" in n for n in names)  # the rule was exercised on LM norms


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_gradient_clipping_caps_the_global_norm_the_optimiser_sees(tmp_path, clip):
    from test_train import first_step_gradients

    ws = make_workspace(tmp_path, n_train=4, caps_per_item=2)
    raw = first_step_gradients(ws, tiny_captioner(), batch_size=8)
    raw_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw.values()])))
    assert raw_norm > 0.05  # so that clipping at 0.05 has work to do
    seen: list[float] = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(record)
    try:
        train(quick(batch_size=8, max_steps=1, clip_grad=clip, name=f"c{clip}"), ws, model=tiny_captioner(),
              quiet=True)
    finally:
        handle.remove()
    assert len(seen) == 1
    assert seen[0] == pytest.approx(clip if clip else raw_norm, rel=1e-4)


@pytest.mark.slow
def test_bf16_training_on_cpu_lowers_the_loss(tmp_path):
    ws = make_workspace(tmp_path, n_train=8, caps_per_item=1)
    result = train(quick(lr=1e-2, max_steps=30, precision="bf16", name="bf16"), ws, model=tiny_captioner(),
                   quiet=True)
    losses = [r["loss"] for r in result.history]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
