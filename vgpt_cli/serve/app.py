"""The FastAPI app of `vgpt serve`: one captioner in memory behind a dynamic batcher.

    POST /v1/captions[?attention=true]  multipart field `images` (one or more) -> a caption per image
    GET  /v1/model                       the captioner's config, backbone and decoding settings
    GET  /health                         liveness and queue length (never needs the API key)
    GET  /                               the browser page (vgpt_cli/serve/page.html, self-contained)
    GET  /docs, /openapi.json            FastAPI's OpenAPI page and schema

Image decoding and resizing to the backbone's input run in worker threads, one per request, and the
model in its own thread (see batcher.py): the event loop only parses requests and moves jobs.
Every refusal is a JSON {"detail": "..."} with a 4xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Callable
from dataclasses import asdict
from importlib import resources
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from vgpt_cli import __version__
from vgpt_cli.serve.batcher import Batcher
from vgpt_cli.serve.uploads import FIELD, Upload, UploadError, read_uploads

DISCONNECT_POLL_S = 0.05  # how often a waiting request checks that its client is still there


# --- the answer's shape (for the OpenAPI page) ---------------------------------------------------------
class Beam(BaseModel):
    caption: str
    score: float


class Token(BaseModel):
    token: str
    visual: float | None = None        # mean visual gate (None: the model has no SRAU gates)
    linguistic: float | None = None
    attention: list[list[float]] | None = None  # with ?attention=true: the (H, W) map over the image grid


class CaptionOut(BaseModel):
    filename: str
    caption: str
    score: float
    cut: bool = False                  # the caption reached the token limit without ending
    beams: list[Beam]
    tokens: list[Token]
    grid: list[int] | None = None      # with ?attention=true: [H, W] of the attention maps


class CaptionsOut(BaseModel):
    results: list[CaptionOut]


class ServeSettings(BaseModel):
    max_batch: int = 16
    max_wait_ms: float = 50.0
    api_key: str | None = None
    max_upload_bytes: int = 20_000_000
    max_files: int = 16
    max_pixels: int = 89_478_485


class ModelFailure(Exception):
    """The model raised while captioning a batch."""


class ClientGone(Exception):
    """The client disconnected while its images waited or ran."""


# --- auth: a pure ASGI middleware, so that FastAPI's own /docs and /openapi.json are covered too --------
class BearerAuth:
    OPEN = ("/health",)

    def __init__(self, app, api_key: str) -> None:
        self.app, self.key = app, api_key.encode("utf-8")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            given = b""
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    given = value
            scheme, _, token = given.partition(b" ")
            # constant time: how much of a guessed key is right does not show in the timing
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                msg = ("missing Authorization header: send 'Authorization: Bearer KEY'" if not given else
                       "wrong API key: send 'Authorization: Bearer KEY' with the key the server was started with")
                response = JSONResponse({"detail": msg}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- the work ---------------------------------------------------------------------------------------
def decode_uploads(uploads: list[Upload], max_pixels: int, prepare: Callable[[Any], Any] | None = None) -> list[Any]:
    """The uploaded bytes decoded in memory (PIL images), each passed through `prepare` when given (the
    server: Backbone.pixels, the model's input); the first bad one refused with its name and reason."""
    from vgpt_cli.features import BadImage, open_rgb_bytes

    images = []
    for i, u in enumerate(uploads):
        try:
            image = open_rgb_bytes(u.data, u.filename, max_pixels)
        except BadImage as e:
            which = f"{u.filename}" if len(uploads) == 1 else f"{u.filename} (file {i + 1} of {len(uploads)})"
            raise UploadError(422, f"{which}: {e.reason}; send a readable JPEG or PNG image") from None
        images.append(prepare(image) if prepare is not None else image)
    return images


def backbone_features(captioner, pixels: list[Any]) -> list[Any]:
    """The batcher's prepare: the backbone over images already decoded and resized in the requests' own
    threads (Backbone.pixels); it runs on a batch's first images while the batch still forms."""
    return captioner.backbone.features_for_pixels(pixels, batch_size=captioner.batch_size)


def caption_batch(captioner, features: list[Any], options: list[dict[str, Any]]) -> list[Any]:
    """The batcher's function: one batched search over the images of several requests (their
    backbone features: backbone_features)."""
    attention = any(o.get("attention") for o in options)
    return captioner.caption_features(features, gates=True, beams=True, attention=attention)


def result_json(result, filename: str, attention: bool) -> dict[str, Any]:
    tokens = [dict(t) for t in (result.tokens or [])]
    out: dict[str, Any] = {"filename": filename, "caption": result.caption, "score": round(result.score, 4),
                           "cut": result.cut,
                           "beams": [{"caption": b["caption"], "score": round(b["score"], 4)}
                                     for b in (result.beams or [])],
                           "tokens": tokens}
    if attention and result.attention is not None:
        maps = result.attention.float().cpu()
        out["grid"] = [int(maps.shape[1]), int(maps.shape[2])]
        for t, m in zip(tokens, maps):
            t["attention"] = [[round(float(v), 5) for v in row] for row in m.tolist()]
    return out


def model_info(captioner, settings: ServeSettings) -> dict[str, Any]:
    meta = captioner.backbone.meta
    return {
        "model_dir": captioner.model_dir,
        "config": captioner.model.config.to_dict(),
        "backbone": {"name": meta.get("backbone"), "fingerprint": meta.get("fingerprint"), "dim": meta.get("dim"),
                     "input_size": (meta.get("data_config") or {}).get("input_size")},
        "decoding": asdict(captioner.options),
        "device": str(captioner.device),
        "precision": captioner.model.precision,
        "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms},
        "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_files": settings.max_files,
                   "max_pixels": settings.max_pixels},
        "version": __version__,
    }


async def wait_for_results(request: Request, batcher: Batcher, futures: list[asyncio.Future]) -> list[Any]:
    """The futures' results; if the client goes away first (or this task is cancelled), its jobs are
    withdrawn: the batcher skips them instead of running them for nobody."""
    gathered = asyncio.gather(*futures)
    try:
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=DISCONNECT_POLL_S)
            if done:
                return gathered.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        batcher.withdraw(futures)
        if gathered.done() and not gathered.cancelled():
            gathered.exception()  # retrieved, so asyncio does not log it as never retrieved


def page_html() -> str:
    return resources.files("vgpt_cli.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(captioner, settings: ServeSettings | None = None) -> FastAPI:
    """The app around a loaded vgpt_cli.api.ImageCaptioner (load_captioner's result)."""
    settings = settings or ServeSettings()
    if captioner.options.rerank_samples:  # every answer carries per-word gates, which sampled captions lack
        from vgpt_cli.errors import ConfigError

        raise ConfigError(f"{captioner.model_dir}: its generation_config.json sets rerank_samples "
                          f"{captioner.options.rerank_samples}, which `vgpt serve` cannot show gates for; set it to 0")
    # one chunk per batch: caption() must not split what the batcher put together
    captioner.batch_size = max(captioner.batch_size, settings.max_batch)
    batcher = Batcher(lambda features, options: caption_batch(captioner, features, options),
                      max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                      prepare=lambda pixels: backbone_features(captioner, pixels))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="vgpt serve", version=__version__, lifespan=lifespan,
                  description="Image captioning with a VisualGPT captioner: captions, beams, per-word gates and "
                              "attention maps. Errors are JSON {\"detail\": \"...\"}.")
    app.state.batcher, app.state.captioner, app.state.settings = batcher, captioner, settings

    @app.exception_handler(UploadError)
    async def _upload_error(_request: Request, e: UploadError) -> JSONResponse:
        return JSONResponse({"detail": e.message}, status_code=e.status)

    @app.exception_handler(ModelFailure)
    async def _model_error(_request: Request, e: ModelFailure) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=500)

    @app.post("/v1/captions", response_model=CaptionsOut, openapi_extra={"requestBody": {
        "required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": [FIELD],
            "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}},
        responses={400: {"description": "a malformed request: missing field, not a file"},
                   401: {"description": "missing or wrong API key"},
                   413: {"description": "body over the size limit, or too many files"},
                   415: {"description": "not multipart/form-data, or a part that is not an image"},
                   422: {"description": "an upload that is not a readable image (empty, truncated, a bomb)"},
                   500: {"description": "the model failed on this batch"}})
    async def captions(request: Request, attention: bool = Query(
            False, description="also return each token's cross-attention map over the image grid")) -> Any:
        """Caption one or more images sent as multipart form field `images`."""
        batcher.announce(1)  # a request on its way: a batch forming now may wait for it (see batcher.py)
        announced = 1
        try:
            try:
                uploads = await read_uploads(request.headers.get("content-type"),
                                             request.headers.get("content-length"), request.stream(),
                                             max_bytes=settings.max_upload_bytes, max_files=settings.max_files)
            except ClientDisconnect:  # hung up while uploading: nobody to answer
                return JSONResponse({"detail": "client disconnected"}, status_code=499)
            batcher.announce(len(uploads) - 1)
            announced = len(uploads)
            # decoding and resizing (PIL, without the GIL) in this request's thread, in parallel with
            # other requests' and with the model: the model thread only stacks, forwards and searches
            pixels = await run_in_threadpool(decode_uploads, uploads, settings.max_pixels, captioner.backbone.pixels)
        finally:
            batcher.retract(announced)
        futures = batcher.submit(pixels, {"attention": attention})  # no await since retract: no gap
        try:
            results = await wait_for_results(request, batcher, futures)
        except ClientGone:  # nobody reads this answer; its jobs are already withdrawn
            return JSONResponse({"detail": "client disconnected"}, status_code=499)
        except Exception as e:
            raise ModelFailure(f"the model failed on this batch ({type(e).__name__}: {e}); the server is still "
                               "up, retry, and check the model folder if it persists") from None
        return JSONResponse({"results": [result_json(r, u.filename, attention) for r, u in zip(results, uploads)]})

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        """The captioner's config, its backbone, and the decoding settings every caption uses."""
        return model_info(captioner, settings)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness (open even with an API key), the queue and what the batcher has done."""
        return {"status": "ok", "queued": batcher.queued, **asdict(batcher.stats)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html())

    if settings.api_key:
        app.add_middleware(BearerAuth, api_key=settings.api_key)
    return app
