"""`vgpt demo`: the whole pipeline on the built-in data, offline, with a final report."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from vgpt_cli.commands import options as opt
from vgpt_cli.commands.common import err, friendly_errors, print_json, say, workspace


@friendly_errors
def command(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="A 2-minute smoke run: 120 scenes, 20 steps.")] = False,
    scenes: Annotated[int | None, typer.Option("--scenes", help="Shapes scenes to generate (default 1000).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="SRAU training steps (default 160, the LM frozen), "
                                              "after 10 epochs of encoder warm start.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of data, initialisation and order (42).")] = None,
    attention_supervision: Annotated[float | None, typer.Option(
        "--attention-supervision", help="Weight of supervised attention at shape words (default 0: off; "
        "docs/research/grounding.md, 1i).")] = None,
    device: opt.Device = None,
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 where the CPU has AMX or AVX-512 "
                                           "BF16, and on CUDA), bf16 or fp32.")] = "auto",
    as_json: opt.Json = False,
) -> None:
    """Run the whole pipeline on built-in data with real pretrained weights, no download needed.

    prepare shapes -> extract-features (EfficientNet-Lite0, ImageNet weights) -> train (SmolLM2-135M + SRAU) -> evaluate on held-out scenes -> caption a few scenes and a real photograph.

    About 10 minutes on a 2-core CPU with AMX or AVX-512 BF16, longer in fp32 without them (docs/results.md);
    --quick is a smoke test of a few minutes. Everything goes into the workspace.

    Example:

        vgpt demo

        vgpt -w /tmp/vgpt-demo demo --quick

        vgpt -w /tmp/vgpt-demo-long demo --steps 480 --attention-supervision 1
    """
    from vgpt_cli.demo import run_demo, settings_for
    from vgpt_cli.device import resolve_device

    device = str(resolve_device(device))  # auto: CUDA, then MPS, then the CPU
    ws = workspace(ctx)
    settings = settings_for(quick, scenes=scenes, steps=steps, seed=seed,
                            attention_supervision=attention_supervision)
    err.print(f"vgpt demo{' --quick' if quick else ''}: workspace {ws.root}", highlight=False)
    if precision not in ("auto", "bf16", "fp32"):
        raise typer.BadParameter(f"--precision {precision}: use auto, bf16 or fp32")
    report = run_demo(ws, settings, device=device, precision=precision, log=say)
    if as_json:
        print_json(report.to_dict())
        return
    table = Table(title=f"vgpt demo: done in {report.seconds:.0f} s", title_justify="left")
    for col in ("step", "seconds", "what happened"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for s in report.steps:
        table.add_row(s["step"], f"{s['seconds']:.0f}", s["summary"])
    err.print(table)
    metrics = Table(title="test scenes", title_justify="left")
    for k in report.metrics:
        metrics.add_column(k, justify="right")
    metrics.add_row(*(f"{v:.3f}" for v in report.metrics.values()))
    err.print(metrics)
    caps = Table(title="captions", title_justify="left")
    caps.add_column("image")
    caps.add_column("caption")
    caps.add_column("the scene holds")
    for c in report.captions:
        caps.add_row(c["image"].rsplit("/", 1)[-1], c["caption"] or "", c.get("truth", "(a real photograph)"))
    err.print(caps)
    for k, v in report.paths.items():
        err.print(f"{k:>12}: {v}", highlight=False)
    err.print("next: [bold]vgpt caption your_image.jpg[/] (uses the demo's model in this workspace)")
