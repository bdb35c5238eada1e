"""`vgpt train`: the loop on tiny random GPT-2 captioners with the real GPT-2 BPE tokenizer.

The helpers here (tiny_captioner, make_workspace) are also used by test_train_ddp.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import gpt2_tokenizer, poison_encoder_at
from safetensors.torch import load_file
from typer.testing import CliRunner

from vgpt_cli.cli import app
from vgpt_cli.data.manifest import Item, Manifest
from vgpt_cli.errors import ConfigError, DataError, ModelLoadError
from vgpt_cli.features.store import StoreWriter
from vgpt_cli.model import Captioner, CaptionerConfig
from vgpt_cli.train import NonFiniteLossError, TrainConfig, load_config_file, train
from vgpt_cli.train.config import PRESETS
from vgpt_cli.train.data import collate, epoch_order, make_plan
from vgpt_cli.train.objectives import token_loss_sum
from vgpt_cli.workspace import Workspace

D_IN = 16
SENTENCES = [
    "a man riding a wave on top of a surfboard",
    "a cat sitting on a wooden table",
    "two dogs playing with a red ball in the grass",
    "a plate of food with broccoli and rice",
    "a red double decker bus on a city street",
    "a woman holding an umbrella in the rain",
    "a train pulling into a station at night",
    "a little girl eating a slice of pizza",
    "an airplane flying over snowy mountains",
    "a bowl of fruit on a kitchen counter",
    "people walking on a beach near the ocean",
    "a giraffe standing next to a tall tree",
    "a laptop and a cup of coffee on a desk",
    "a boy throwing a frisbee in a park",
    "a stop sign at the corner of a street",
    "a horse grazing in a green field",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards (see conftest.py)


def tiny_captioner(seed: int = 0, dropout: float = 0.0, tau: float = 0.2, width: int = 32) -> Captioner:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=width, n_head=2, n_positions=64, resid_pdrop=dropout,
                                    embd_pdrop=dropout, attn_pdrop=dropout))
    cfg = CaptionerConfig(lm="gpt2", d_in=D_IN, encoder_layers=2, encoder_ffn=2 * width, encoder_dropout=dropout,
                          cross_attn_dropout=dropout, tau=tau)
    return Captioner.from_config(cfg, lm=lm, tokenizer=gpt2_tokenizer())


def tiny_lm_folder(path: Path) -> Path:
    """tiny_captioner's LM and tokenizer saved as a local LM folder (what `vgpt train --lm DIR` reads)."""
    tiny = tiny_captioner()
    tiny.lm.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return path


def make_workspace(root: Path, n_train: int = 4, caps_per_item: int = 2, n_val: int = 0,
                   missing: tuple[str, ...] = ()) -> Workspace:
    """A workspace with a prepared toy dataset and a feature store (random features, 3-6 tokens each)."""
    ws = Workspace(Path(root))
    rng = np.random.default_rng(0)
    sentences = iter(SENTENCES * 4)
    train_items = [Item(f"t{i}", [f"/img/t{i}.jpg"], [next(sentences) for _ in range(caps_per_item)])
                   for i in range(n_train)]
    val_items = [Item(f"v{i}", [f"/img/v{i}.jpg"], [SENTENCES[i % len(SENTENCES)], SENTENCES[(i + 3) % 16]])
                 for i in range(n_val)]
    Manifest(dataset="toy", format="test", splits={"train": train_items, "val": val_items, "test": []}).save(
        ws.manifest_path("toy"))
    with StoreWriter(ws.features_root / "fp0", {"dim": D_IN, "fingerprint": "fp0", "backbone": "toy"}) as w:
        w.append([(it.id, it.images, rng.standard_normal((int(rng.integers(3, 7)), D_IN)).astype(np.float16))
                  for it in train_items + val_items if it.id not in missing])
    ws.set_current(dataset="toy", features="fp0")
    return ws


def quick(**kw) -> TrainConfig:
    # The paper's recipe (these tests were written for it; tests/test_grounding_recipe.py covers the defaults)
    base = dict(PRESETS["paper"], preset="paper", lm="gpt2", device="cpu", lr=1e-3, batch_size=8, max_steps=1,
                patience=100, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def relative_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over all tensors, relative to max |b|."""
    return max_diff(a, b) / max(float(v.double().abs().max()) for v in b.values())


def first_step_gradients(ws: Workspace, model, **cfg) -> dict[str, torch.Tensor]:
    """p.grad after the loop's first cross-entropy step (all micro-batches, all processes; before
    clipping and the optimiser), from the trainer's own xe_step. Under torchrun-style environment
    variables the model is wrapped in DDP as train() does, so the gradients are all-reduced."""
    from vgpt_cli.distributed import setup_distributed
    from vgpt_cli.train.loop import prepare_inputs
    from vgpt_cli.train.trainer import Trainer

    config = quick(**cfg)
    dist = setup_distributed("cpu")
    store, train_items, val_items, _ = prepare_inputs(config, ws)
    trainer = Trainer(config, ws, dist, model=model, store=store, train_items=train_items, val_items=val_items,
                      run_dir=ws.root / "unused")
    try:
        trainer.setup_phase("xe")
        if dist.enabled:
            trainer.model = torch.nn.parallel.DistributedDataParallel(model)
        trainer.xe_step(trainer.xe_batches(0))
    finally:
        trainer.close()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --- data order and the loss ------------------------------------------------------------------------
def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(10, 42, 0), epoch_order(10, 42, 0)
    assert a == b and sorted(a) == list(range(10))
    assert epoch_order(10, 42, 1) != a  # reshuffled every epoch
    plan = make_plan(20, batch_size=4, grad_accum=2, world_size=2)
    assert plan.global_batch == 16 and plan.steps_per_epoch == 1
    parts = [plan.micro_batches(list(range(20)), 0, r) for r in range(2)]
    assert parts == [[[0, 1, 2, 3], [4, 5, 6, 7]], [[8, 9, 10, 11], [12, 13, 14, 15]]]


def test_summed_token_loss_matches_the_models_own_mean_loss(tmp_path):
    ws = make_workspace(tmp_path)
    model = tiny_captioner()
    from vgpt_cli.features.store import open_workspace_store
    from vgpt_cli.train.data import caption_examples

    store = open_workspace_store(ws)
    examples = caption_examples(Manifest.load(ws.manifest_path("toy")).items("train"))
    b = collate(store, model, examples, max_length=20)
    with torch.no_grad():
        out = model(b.features, b.lengths, b.input_ids, b.attention_mask, labels=b.labels, image_index=b.image_index)
    assert b.n_targets == int((b.labels != -100).sum()) > len(examples)
    mine = token_loss_sum(out.logits, b.labels) / b.n_targets
    torch.testing.assert_close(mine, out.loss, rtol=1e-6, atol=1e-6)
    # and against a float64 recomputation by hand
    logp = torch.log_softmax(out.logits.double(), -1)
    mask = b.labels != -100
    ref = -logp.gather(-1, b.labels.clamp_min(0)[..., None])[..., 0][mask].sum()
    assert abs(float(token_loss_sum(out.logits.detach(), b.labels)) - float(ref)) < 1e-3


def test_unlikelihood_matches_a_loop_over_positions_and_earlier_words():
    from vgpt_cli.train.objectives import unlikelihood_sum

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 9, generator=gen, dtype=torch.float64) * 3
    labels = torch.tensor([[4, 2, 4, 7, 2, 1], [3, 3, 5, 8, -100, -100]])
    want = 0.0
    for b in range(2):
        for t in range(6):
            if labels[b, t] < 0:
                continue
            p = logits[b, t].softmax(-1)
            earlier = {int(c) for c in labels[b, :t] if c >= 0} - {int(labels[b, t])}
            want += sum(-math.log(1 - float(p[c])) for c in earlier)
    assert float(unlikelihood_sum(logits, labels)) == pytest.approx(want, rel=1e-6)
    # sure of an earlier word that is not its target: a large penalty; sure of its own target (which it
    # has written before): none
    sure = torch.full((1, 5, 9), -30.0, dtype=torch.float64)
    sure[0, torch.arange(5), labels[0, :5]] = 30.0  # every position sure of its target (4, 2, 4, 7, 2)
    assert float(unlikelihood_sum(sure, labels[:1, :5])) < 1e-6
    sure[0, 4, 2], sure[0, 4, 4] = -30.0, 30.0  # position 4 (target 2) sure of the earlier 4
    assert float(unlikelihood_sum(sure, labels[:1, :5])) > 10  # -log(1e-6): p is capped below 1


def test_the_unlikelihood_weight_reaches_the_backward_and_the_logged_loss_stays_cross_entropy(tmp_path):
    from vgpt_cli.distributed import DistContext
    from vgpt_cli.features.store import open_workspace_store
    from vgpt_cli.train.data import caption_examples
    from vgpt_cli.train.objectives import cross_entropy_step, unlikelihood_sum

    ws = make_workspace(tmp_path)
    model = tiny_captioner()
    examples = caption_examples(Manifest.load(ws.manifest_path("toy")).items("train"))
    b = collate(open_workspace_store(ws), model, examples, max_length=20)
    with torch.no_grad():
        logits = model(b.features, b.lengths, b.input_ids, b.attention_mask, image_index=b.image_index).logits
    ce, ul = float(token_loss_sum(logits, b.labels)), float(unlikelihood_sum(logits, b.labels))
    assert ul > 0
    seen: list[float] = []
    for w in (0.0, 5.0):
        seen.clear()
        loss, n, _ = cross_entropy_step(model, [b], DistContext(), lambda t: seen.append(float(t.detach())),
                                        precision="fp32", label_smoothing=0.0, unlikelihood=w)
        assert loss == pytest.approx(ce / n, rel=1e-5)  # what is logged: the cross-entropy alone
        assert seen[0] == pytest.approx((ce + w * ul) / n, rel=1e-5)  # what is trained


# --- training behaviour ------------------------------------------------------------------------------
@pytest.mark.slow
def test_loss_falls_and_eight_captions_are_fitted(tmp_path):
    ws = make_workspace(tmp_path, n_train=8, caps_per_item=1)  # 8 images, one caption each
    result = train(quick(lr=1e-2, max_steps=80, name="fit"), ws, model=tiny_captioner(), quiet=True)
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 80
    assert losses[0] > 10.0  # ln(50257) = 10.8 at random initialisation
    assert all(np.mean(losses[i + 10:i + 20]) < np.mean(losses[i:i + 10]) for i in range(0, 70, 10))
    assert losses[-1] < 0.05, losses[-10:]  # near zero: about 95% probability on every caption token
    run = result.run_dir
    assert (run / "config.json").is_file() and (run / "best" / "model.safetensors").is_file()
    assert not (run / "last").exists()  # a run that ended normally cannot be resumed: no optimiser state kept
    assert json.loads((run / "best" / "preprocessor.json").read_text())["backbone"] == "toy"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 81))
    assert ws.state()["run"] == "fit" and ws.state()["training"] is None
    saved = json.loads((run / "config.json").read_text())
    assert saved["lr"] == 1e-2 and saved["name"] == "fit" and saved["dataset"] == "toy"


def test_accumulation_2x8_gives_the_gradient_of_batch_16(tmp_path):
    """Gradients, not weights after one AdamW step: AdamW's first step is about lr * sign(g), blind to
    the scale of the loss. Dividing the loss by grad_accum twice fails this test (checked by hand)."""
    ws = make_workspace(tmp_path, n_train=8, caps_per_item=2)  # 16 captions of different lengths
    g16 = first_step_gradients(ws, tiny_captioner(), batch_size=16, grad_accum=1)
    g8x2 = first_step_gradients(ws, tiny_captioner(), batch_size=8, grad_accum=2)
    assert len(g16) == len(list(tiny_captioner().parameters()))  # every parameter got a gradient
    assert relative_diff(g8x2, g16) <= 1e-5
    # the test sees the scale: half or double the loss is far outside the tolerance
    assert relative_diff({k: 2 * v for k, v in g8x2.items()}, g16) > 0.5
    assert relative_diff({k: v / 2 for k, v in g8x2.items()}, g16) > 0.25
    # one micro-batch's gradient alone is not it either
    g8 = first_step_gradients(ws, tiny_captioner(), batch_size=8, grad_accum=1)
    assert relative_diff(g8, g16) > 1e-2


def test_accumulation_2x8_equals_batch_16_after_a_step(tmp_path):
    ws = make_workspace(tmp_path, n_train=8, caps_per_item=2)  # 16 captions of different lengths
    whole = tiny_captioner()
    train(quick(batch_size=16, grad_accum=1, name="b16"), ws, model=whole, quiet=True)
    accum = tiny_captioner()
    train(quick(batch_size=8, grad_accum=2, name="b8x2"), ws, model=accum, quiet=True)
    start = params(tiny_captioner())
    assert max_diff(params(whole), start) > 1e-4  # the step did move the parameters
    assert max_diff(params(whole), params(accum)) <= 1e-5
    # The bug the authors' code had (optimiser step per micro-batch) is far from it:
    two_steps = tiny_captioner()
    train(quick(batch_size=8, grad_accum=1, name="b8"), ws, model=two_steps, quiet=True)
    assert max_diff(params(whole), params(two_steps)) > 1e-4


def test_resume_repeats_the_uninterrupted_losses(tmp_path):
    ws = make_workspace(tmp_path, n_train=6, caps_per_item=2)  # 12 captions, 3 steps per epoch
    cfg = dict(batch_size=4, max_steps=7, save_every=2, lr=1e-3)
    full = train(quick(name="full", **cfg), ws, model=tiny_captioner(dropout=0.1), quiet=True, keep_last=True)

    class Killed(Exception):
        pass

    def kill_at_5(record):
        if record["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        train(quick(name="cut", **cfg), ws, model=tiny_captioner(dropout=0.1), on_step=kill_at_5, quiet=True)
    state = json.loads((ws.run_dir("cut") / "last" / "trainer_state.json").read_text())
    assert state["step"] == 4
    resumed = train(quick(name="cut", **cfg), ws, resume=True, quiet=True, keep_last=True)
    before = {r["step"]: r["loss"] for r in full.history}
    after = {r["step"]: r["loss"] for r in resumed.history}
    assert sorted(after) == [5, 6, 7]
    for step in after:
        assert abs(after[step] - before[step]) <= 1e-6, (step, after[step], before[step])
    a = load_file(str(ws.run_dir("full") / "last" / "model.safetensors"))
    b = load_file(str(ws.run_dir("cut") / "last" / "model.safetensors"))
    assert max_diff(a, b) <= 1e-6


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    ws = make_workspace(tmp_path)
    model = tiny_captioner()

    poison_after_2 = poison_encoder_at(model, 2)

    with pytest.raises(NonFiniteLossError, match="loss is nan.*last good checkpoint"):
        train(quick(max_steps=5, save_every=1, name="nan"), ws, model=model, on_step=poison_after_2, quiet=True)
    state = json.loads((ws.run_dir("nan") / "last" / "trainer_state.json").read_text())
    assert state["step"] == 2
    weights = load_file(str(ws.run_dir("nan") / "last" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


# --- configuration -------------------------------------------------------------------------------------
def test_config_file_and_flags(tmp_path):
    (tmp_path / "t.yaml").write_text("lr: 5.0e-5\nlm-lr: 1e-5\nbatch_size: 10\nscst: true\n")
    cfg = load_config_file(tmp_path / "t.yaml")
    assert (cfg.lr, cfg.lm_lr, cfg.batch_size, cfg.scst) == (5e-5, 1e-5, 10, True)
    cfg2 = cfg.override(lr=2e-4, batch_size=None)  # an unset flag never overrides the file
    assert (cfg2.lr, cfg2.batch_size) == (2e-4, 10)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg2.to_dict()))) == cfg2
    (tmp_path / "bad.json").write_text('{"learning_rate": 1}')
    with pytest.raises(ConfigError, match="unknown training option.*learning_rate"):
        load_config_file(tmp_path / "bad.json")
    defaults = TrainConfig()
    assert (defaults.tau, defaults.encoder_layers, defaults.lr, defaults.lm_lr, defaults.gate_init_bias,
            defaults.preset) == (0.2, 1, 1e-3, 1e-4, 5.0, "vgpt")
    paper = TrainConfig.from_preset("paper")
    assert (paper.tau, paper.encoder_layers, paper.lr, paper.resolved_lm_lr, paper.gate_init_bias, paper.warmup,
            paper.batch_size, paper.clip_grad, paper.val_beam, paper.max_length, paper.freeze_lm_steps,
            paper.encoder_warm_start, paper.preset) == (0.2, 3, 1e-4, 1e-4, None, 0, 50, 1.0, 5, 20, 0, 0, "paper")
    assert defaults.encoder_warm_start == 10
    # consensus reranking: the default's decoding; the paper's and the demo's recipes decode without it
    assert (defaults.rerank, paper.rerank, TrainConfig.from_preset("demo").rerank) == (20, 0, 0)
    (tmp_path / "p.yaml").write_text("preset: paper\nlr: 2e-4\n")
    from_file = load_config_file(tmp_path / "p.yaml")
    assert (from_file.encoder_layers, from_file.lr, from_file.preset) == (3, 2e-4, "paper")
    with pytest.raises(ConfigError, match="preset 'nope'"):
        TrainConfig.from_preset("nope")


def test_the_demo_trains_vgpt_train_preset_demo():
    """`vgpt demo`'s recipe is written once, as the demo preset: the demo's config is `--preset demo` plus
    its run options, and its --steps keeps the LM frozen for every step."""
    from vgpt_cli.demo import demo_config, settings_for

    demo = demo_config(settings_for(False), precision="fp32", device="cpu", name="demo")
    preset = TrainConfig.from_preset("demo").override(precision="fp32", device="cpu", name="demo")
    assert demo == preset
    assert (demo.gating, demo.encoder_layers, demo.gate_init_bias, demo.lm, demo.max_steps, demo.freeze_lm_steps,
            demo.encoder_warm_start, demo.seed) == ("srau", 1, 5.0, "smollm2-135m", 160, 160, 10, 42)
    longer = demo_config(settings_for(False, steps=480, seed=7, attention_supervision=1.0))
    assert (longer.max_steps, longer.freeze_lm_steps, longer.seed, longer.attention_supervision) == (480, 480, 7, 1.0)
    quick = demo_config(settings_for(True))
    assert (quick.max_steps, quick.freeze_lm_steps, quick.val_beam, quick.encoder_warm_start) == (20, 20, 1, 2)
    result = runner.invoke(app, ["train", "--preset", "nope"])
    assert result.exit_code != 0 and "demo" in result.output  # the error lists the presets


runner = CliRunner()


@pytest.mark.parametrize("args, message", [
    (["--tau", "0.6"], "tau 0.6"),
    (["--coverage", "nan"], "--coverage nan: must be a finite number"),
    (["--unlikelihood", "-1"], "--unlikelihood -1.0: must be a finite weight >= 0"),
    (["--lr", "-1e-4"], "--lr -0.0001: a learning rate must be a positive"),
    (["--lm", "no/such/folder-xyz"], "cannot load the language model"),
    (["--lm", "/nowhere/model.gguf"], "GGUF file not found"),
])
def test_bad_configuration_fails_before_training(tmp_path, args, message):
    ws = make_workspace(tmp_path)
    result = runner.invoke(app, ["-w", str(ws.root), "train", "--device", "cpu", "--name", "bad", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (ws.run_dir("bad") / "metrics.jsonl").exists()
    assert not (ws.run_dir("bad") / "last").exists()


def test_a_hub_lm_that_is_not_cached_fails_offline_before_training(tmp_path, monkeypatch):
    from huggingface_hub import constants, try_to_load_from_cache

    # An empty hub cache: the same on every machine (gpt2 may be in this one's real cache).
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    assert not isinstance(try_to_load_from_cache("gpt2", "config.json"), str)
    ws = make_workspace(tmp_path)
    result = runner.invoke(app, ["-w", str(ws.root), "train", "--device", "cpu", "--name", "hub", "--lm", "gpt2"])
    assert result.exit_code == 2, result.output
    assert "gpt2: cannot load the language model" in " ".join(result.output.split())
    assert not (ws.run_dir("hub") / "last").exists()


def test_missing_features_fail_before_loading_any_model(tmp_path):
    ws = make_workspace(tmp_path, missing=("t2",))
    with pytest.raises(DataError, match="t2.*not extracted.*vgpt extract-features"):
        # lm names a folder that does not exist: the data check must come first
        train(quick(lm=str(tmp_path / "no-lm")), ws, quiet=True)
    with pytest.raises(ModelLoadError):
        train(quick(lm=str(tmp_path / "no-lm")), make_workspace(tmp_path / "ok"), quiet=True)


# --- validation, early stopping, SCST, the CLI -------------------------------------------------------------
def test_validation_keeps_best_and_stops_early(tmp_path):
    from pycocoevalcap.cider.cider import Cider

    from vgpt_cli.decode import DecodeOptions, decode
    from vgpt_cli.evaluate.tokenize import tokenize_caption
    from vgpt_cli.features.store import open_workspace_store
    from vgpt_cli.train.data import pad_features

    ws = make_workspace(tmp_path, n_train=4, caps_per_item=1, n_val=3)
    # A learning rate too small to change any caption: every validation ties, none improves.
    result = train(quick(lr=1e-12, max_steps=10, val_every=1, patience=2, val_size=2, name="es"), ws,
                   model=tiny_captioner(), quiet=True)
    assert (result.stopped, result.steps, result.best_step) == ("early_stopping", 3, 1)
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r.get("event") == "validation"]
    assert [v["step"] for v in vals] == [1, 2, 3] and [v["improved"] for v in vals] == [True, False, False]
    # The recorded CIDEr-D is pycocoevalcap's, on beam-5 captions of the best checkpoint (val_size: 2 items).
    best = Captioner.from_pretrained(result.run_dir / "best")
    items = Manifest.load(ws.manifest_path("toy")).items("val")[:2]
    feats, lengths = pad_features([open_workspace_store(ws).get(it.id) for it in items])
    with torch.no_grad():
        preds = [h.text for h in decode(best, feats, lengths, DecodeOptions(beam_size=5, max_length=20))]
    gts = {it.id: [tokenize_caption(c) for c in it.captions] for it in items}
    res = {it.id: [tokenize_caption(p)] for it, p in zip(items, preds)}
    reference, _ = Cider().compute_score(gts, res)
    assert abs(vals[0]["cider"] - reference) < 1e-9
    assert result.best_score == vals[0]["cider"]


@pytest.mark.slow
def test_one_scst_step_raises_the_expected_reward(tmp_path):
    from vgpt_cli.decode import sample
    from vgpt_cli.evaluate.metrics import CiderD
    from vgpt_cli.features.store import open_workspace_store
    from vgpt_cli.train.data import pad_features

    ws = make_workspace(tmp_path, n_train=8, caps_per_item=1)
    model = tiny_captioner(seed=1)
    train(quick(lr=1e-2, max_steps=30, name="xe"), ws, model=model, quiet=True)  # half-trained: varied samples
    items = Manifest.load(ws.manifest_path("toy")).items("train")
    feats, lengths = pad_features([open_workspace_store(ws).get(it.id) for it in items])
    reward = CiderD([it.captions for it in items])  # document frequencies of the training captions

    def expected_reward() -> float:
        """Mean CIDEr-D of 2 x 16 samples per image, with the same random numbers before and after."""
        model.eval()
        scores = []
        for seed in (5, 6):
            with torch.no_grad():
                s = sample(model, feats, lengths, num_samples=16, generator=torch.Generator().manual_seed(seed))
            scores.append(reward.score(s.texts, [items[int(i)].captions for i in s.image_index])[0])
        return float(np.mean(scores))

    before = expected_reward()
    # --max-steps 0 --scst: SCST alone, one step over all 8 images, 16 samples each
    result = train(quick(max_steps=0, scst=True, scst_epochs=1, scst_batch_size=8, scst_samples=16,
                         scst_lr=1e-3, name="scst"), ws, model=model, quiet=True)
    assert result.scst_steps == 1 and result.history[0]["phase"] == "scst"
    assert result.history[0]["reward"] > 0
    after = expected_reward()
    assert after > before + 0.02, (before, after)  # seen: 0.617 -> 0.656


@pytest.mark.slow
def test_cli_trains_from_a_local_lm_folder_with_a_config_file(tmp_path):
    lm_dir = tiny_lm_folder(tmp_path / "tiny-gpt2")
    ws = make_workspace(tmp_path / "ws", n_train=4, caps_per_item=2)
    (tmp_path / "train.yaml").write_text(f"lm: {lm_dir}\nbatch-size: 3\nmax_steps: 5\nlr: 1.0e-3\n")
    result = runner.invoke(app, ["-w", str(ws.root), "train", "--config", str(tmp_path / "train.yaml"),
                                 "--max-steps", "2", "--encoder-layers", "1", "--device", "cpu", "--name", "cli",
                                 "--keep-last", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["steps"] == 2 and out["run_dir"] == str(ws.run_dir("cli"))
    saved = json.loads((ws.run_dir("cli") / "config.json").read_text())
    assert (saved["lm"], saved["batch_size"], saved["max_steps"], saved["encoder_layers"]) == (str(lm_dir), 3, 2, 1)
    assert "vgpt evaluate --split test" in result.stderr
    # stderr is not a terminal here: progress comes as plain lines (the last step's always), not a live bar
    assert "cross-entropy: step 2/2, loss " in result.stderr
    model = Captioner.from_pretrained(ws.run_dir("cli") / "best")
    assert model.config.encoder_layers == 1 and model.config.d_in == D_IN
    # resume with more steps continues at step 2
    result = runner.invoke(app, ["-w", str(ws.root), "train", "--resume", "--max-steps", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 3


def test_progress_without_a_terminal_is_a_plain_line_with_the_rate_and_time_left():
    import io

    from rich.console import Console

    from vgpt_cli.train.console import ConsoleReport

    def lines(terminal: bool, plain_every: float) -> list[str]:
        out = io.StringIO()
        report = ConsoleReport(Console(file=out, force_terminal=terminal, width=200), plain_every=plain_every)
        report.on_phase_start("xe", total=30, done=10)  # resumed at step 10
        for step in (20, 30):
            report.on_log({"step": step, "loss": 1.0 / step, "tokens_per_s": 1234.5})
        report.on_phase_end("xe")
        return [ln for ln in out.getvalue().splitlines() if ln.startswith("cross-entropy: step")]

    every = lines(terminal=False, plain_every=0)
    assert len(every) == 2
    assert every[0].startswith("cross-entropy: step 20/30, loss 0.0500, 1,234 tok/s, ")
    assert every[0].endswith(" left") and "s/step" in every[0]
    assert every[1].startswith("cross-entropy: step 30/30, loss 0.0333") and not every[1].endswith(" left")
    # at most one line a minute, but always the last step's
    assert [ln.split(",")[0] for ln in lines(terminal=False, plain_every=3600)] == ["cross-entropy: step 30/30"]
    assert lines(terminal=True, plain_every=0) == []  # a terminal gets the live bar instead

    # messages and captions are plain text: brackets in them are not rich markup
    out = io.StringIO()
    report = ConsoleReport(Console(file=out, force_terminal=False, width=200))
    report.on_message("[train] wrote runs/[a]/best")
    report.on_message("[warm] fell back", warning=True)
    report.on_validation({"phase": "xe", "step": 2, "cider": 0.5, "best_cider": 0.5, "best_phase": "xe",
                          "best_step": 2}, {"patience_left": 3, "seconds": 1.0,
                                            "examples": [{"id": "[img]", "caption": "a [red] star"}]})
    text = out.getvalue()
    assert "[train] wrote runs/[a]/best" in text and "[warm] fell back" in text
    assert "[img]: a [red] star" in text


def test_val_every_replaces_the_per_epoch_validation(tmp_path):
    ws = make_workspace(tmp_path, n_train=4, caps_per_item=1, n_val=2)  # 4 captions, batch 2: 2 steps an epoch

    def validated(**kw) -> list[int]:
        result = train(quick(batch_size=2, max_steps=7, val_size=1, **kw), ws, model=tiny_captioner(), quiet=True)
        records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in records if r.get("event") == "validation"]

    assert validated(name="epochs") == [2, 4, 6, 7]  # each epoch's end, and the last step
    assert validated(name="every3", val_every=3) == [3, 6, 7]  # not at the epoch ends 2 and 4


def test_training_length_is_steps_unless_epochs_are_asked(tmp_path):
    """No --epochs/--max-steps: DEFAULT_XE_STEPS steps whatever the data's size; --epochs N: N epochs of the
    data; --max-steps wins over both; the run says which ended it."""
    from vgpt_cli.train.config import DEFAULT_XE_STEPS

    assert TrainConfig().xe_steps(steps_per_epoch=7) == DEFAULT_XE_STEPS
    assert TrainConfig().xe_steps(steps_per_epoch=7000) == DEFAULT_XE_STEPS
    assert TrainConfig(epochs=3).xe_steps(steps_per_epoch=7) == 21
    assert TrainConfig(epochs=3, max_steps=5).xe_steps(steps_per_epoch=7) == 5
    assert (TrainConfig().length_limit, TrainConfig(epochs=2).length_limit) == ("max_steps", "epochs")
    with pytest.raises(ConfigError, match="--epochs 0"):
        TrainConfig(epochs=0).validate()
    ws = make_workspace(tmp_path, n_train=4, caps_per_item=1, n_val=2)  # 4 captions, batch 2: 2 steps an epoch
    result = train(quick(batch_size=2, max_steps=None, epochs=2, val_size=1, name="e2"), ws, model=tiny_captioner(),
                   quiet=True)
    assert (result.steps, result.stopped) == (4, "epochs")


def test_train_help_defaults_are_train_configs():
    """Every default (and paper value) that `vgpt train --help` writes is TrainConfig's (PRESETS') own,
    and no flag has a default of its own that could override TrainConfig or a --config file."""
    import re

    import typer.main

    from vgpt_cli.commands.train import show

    command = typer.main.get_command(app).commands["train"]
    defaults, paper = TrainConfig(), TrainConfig.from_preset("paper")
    checked = 0
    for param in command.params:
        if param.name in defaults.to_dict():
            assert param.default is None, f"--{param.name} has its own default {param.default!r}"
        m = re.search(r"\(default ([^;)]+)[;)]", param.help or "")
        if m and param.name in defaults.to_dict():
            assert m.group(1) == show(getattr(defaults, param.name)), param.name
            checked += 1
        p = re.search(r"; paper ([^;)]+)\)", param.help or "")
        if p and param.name in defaults.to_dict():
            assert p.group(1) == show(getattr(paper, param.name)), param.name
    assert checked >= 15
    doc = command.help
    assert f"plain cross-attention from the pretrained LM to K = {defaults.encoder_layers} encoder level" in doc
    assert defaults.gating == "none" and f"--gating srau (tau {show(defaults.tau)}" in doc
    assert f"AdamW {show(defaults.lr)} for the new parameters and {show(defaults.lm_lr)} for the LM" in doc
    assert f"(SRAU, K = {paper.encoder_layers}, their gate init, lr {show(paper.lr)}, batch {paper.batch_size})" in doc
    assert "{" not in doc
