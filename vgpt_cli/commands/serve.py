"""`vgpt serve`: caption images over HTTP with one model in memory. Parsing and starting only."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from vgpt_cli.commands import options as opt
from vgpt_cli.commands.common import err, friendly_errors, workspace
from vgpt_cli.errors import ConfigError

API_KEY_ENV = "VGPT_API_KEY"


@friendly_errors
def command(
    ctx: typer.Context,
    model: opt.ModelDir = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 opens it to the network.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one).")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help=(
        "At most this many images (of any requests) per batched search."))] = 16,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", min=0, help=(
        "A batch waits at most this long for images already arriving (being received or decoded), "
        "and for the clients the last batch answered while it is smaller than that batch; otherwise "
        "it starts at once."))] = 50.0,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar=API_KEY_ENV, show_envvar=True, help=(
        "Require 'Authorization: Bearer KEY' on every endpoint but /health."))] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="Largest request body.")
                             ] = 20.0,
    max_files: Annotated[int, typer.Option("--max-files", min=1, help="Most images in one request.")] = 16,
    device: opt.Device = None,
    precision: opt.Precision = "fp32",
) -> None:
    """Serve captions over HTTP: a JSON API, its OpenAPI page (/docs) and a browser page (/).

    Concurrent requests are batched into one beam search (up to --max-batch images, or what arrives
    within --max-wait-ms; a lone request does not wait). Decoding uses the settings saved with the
    model. Needs the serve extra: pip install 'vgpt\\[serve]'.

    Example:

        vgpt serve

        vgpt serve --model runs/r1/best --port 8080 --api-key "$(openssl rand -hex 16)"

        vgpt serve --precision int8

        curl -F images=@photo.jpg http://127.0.0.1:8000/v1/captions
    """
    try:
        import uvicorn

        from vgpt_cli.serve.app import ServeSettings, create_app
    except ImportError as e:
        raise ConfigError(f"vgpt serve needs the serve extra ({e.name} is missing): pip install 'vgpt[serve]'"
                          ) from None
    from vgpt_cli.api import load_captioner
    from vgpt_cli.model_folders import resolve_model_dir

    if api_key is not None and not api_key.strip():
        raise ConfigError(f"--api-key (or ${API_KEY_ENV}) is empty: give a key, or leave both unset")
    ws = workspace(ctx)
    model_dir = resolve_model_dir(ws, model)
    err.print(f"loading {model_dir} ...", highlight=False)
    captioner = load_captioner(model_dir, workspace=ws, device=device, batch_size=max_batch, precision=precision)
    for line in captioner.notes:
        err.print(f"[yellow]note:[/] {line}", highlight=False)
    settings = ServeSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, api_key=api_key,
                             max_upload_bytes=int(max_upload_mb * 1_000_000), max_files=max_files)
    app = create_app(captioner, settings)
    o = captioner.options
    shown = "[::1]" if host == "::1" else host
    err.print(f"serving {model_dir} (beam {o.beam_size}, at most {o.max_length} tokens, {precision}) on http://{shown}:{port}/ "
              f"({'API key required' if api_key else 'no API key'}); Ctrl-C stops", highlight=False)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key and not os.environ.get(API_KEY_ENV):
        err.print(f"[yellow]warning:[/] {host} is reachable from other machines and no --api-key is set",
                  highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="info")
