"""The HTTP service: FastAPI routes over a `ModelRegistry`, a `MicroBatcher` and a
`ReviewStore`.

Routes (every error is a JSON body `{"error": message, "status": code}`):

- `POST /v1/models/{name}/predict` — images as multipart files (any field name) or JSON
  `{"images": [{"data": base64, "filename": ...}]}`; query `maps=none|png|array`,
  `overlay=true`, `review=true` (record for the review page). 400 bad image or request,
  401 key, 404 model, 413 too large, 415 content type, 503 + Retry-After queue full.
- `GET /v1/models`; `GET /healthz` (alive), `GET /readyz` (models loaded, workers running),
  `GET /metrics` (Prometheus text).
- Review: `GET /` (the page), `GET /v1/reviews`, `GET /v1/reviews/{id}/image|overlay`,
  `POST /v1/reviews/{id}` (verdict), `GET /v1/reviews/export.csv`, `GET /v1/reviews/export.zip`.

Images are decoded by `data.images.to_pil_image` (the CLI's hardened decoder and pixel limits)
and size-checked by the model's preprocessor before they are queued. With an API key set, every
route but the page, its static files, /healthz and /readyz needs `X-API-Key: KEY` or
`Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import RuntimeSettings
from ..data.images import to_pil_image
from ..errors import ConfigError, DataError, PatchCoreError
from .batching import Closed, MicroBatcher, QueueFull
from .metrics import Metrics
from .models import ModelRegistry, UnknownModel
from .results import MAP_FORMATS, image_result, overlay_png
from .store import ReviewStore

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class ServeOptions:
    """How the service batches, limits and records (the `patchcore serve` options)."""

    max_batch: int = 8  # images scored together at most
    batch_wait_ms: float = 5.0  # how long a batch waits for more images
    queue_size: int = 64  # images admitted (decoding or queued) at most; beyond: 503
    workers: int = 1  # scoring threads
    max_request_bytes: int = 32 * 2**20  # a larger request body: 413
    max_images: int = 32  # images per request at most: 413
    api_key: str | None = None
    db: Path | None = None  # the review database; None: no review store
    check_interval: float = 1.0  # seconds between checks of a model folder for a new save
    max_records: int = 2000  # unreviewed predictions kept for the review page

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue_size", "workers", "max_request_bytes", "max_images",
                     "max_records"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0 or self.batch_wait_ms > 10_000:
            raise ConfigError(f"batch_wait_ms must be in 0..10000, got {self.batch_wait_ms}")
        if self.check_interval < 0:
            raise ConfigError("check_interval must be >= 0")
        if self.max_images > self.queue_size:
            raise ConfigError(f"max_images ({self.max_images}) must not exceed queue_size "
                              f"({self.queue_size}): such a request could never be admitted")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ConfigError("the API key must have at least 8 characters")


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    """ConfigError when the service would listen beyond loopback without an API key."""
    if not is_loopback(host) and not api_key:
        raise ConfigError(f"--host {host} accepts connections from other machines: set an API "
                          "key with --api-key or PATCHCORE_API_KEY (or bind to 127.0.0.1)")


class ApiError(Exception):
    """An error answered as JSON with `status` (and optional headers)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    """The JSON error body every failure gets."""
    return JSONResponse({"error": message, "status": status}, status_code=status,
                        headers=headers)


def default_loader(settings: RuntimeSettings) -> Callable[[Path], Any]:
    """Load a model folder with `settings` and score one small image (so the first request
    does not pay for building the backbone)."""
    from ..model import PatchCore

    def load(path: Path) -> Any:
        model = PatchCore.load(path, **dataclasses.asdict(settings))
        model.predict(Image.new("RGB", (model.config.imagesize,) * 2))
        return model

    return load


def default_scorer(model: Any, images: list[Any]) -> Any:
    """Score decoded images with one `predict` call."""
    return model.predict(images)


class Service:
    """Models, batcher, metrics and review store of one running service."""

    def __init__(self, source: str | os.PathLike, options: ServeOptions | None = None,
                 settings: RuntimeSettings | None = None,
                 loader: Callable[[Path], Any] | None = None,
                 scorer: Callable[[Any, list[Any]], Any] | None = None) -> None:
        self.options = options or ServeOptions()
        settings = (settings or RuntimeSettings()).replace(progress=False)
        self.registry = ModelRegistry(source, loader or default_loader(settings),
                                      self.options.check_interval)
        self.registry.load_all()
        self.metrics = Metrics()
        o = self.options
        self.batcher = MicroBatcher(scorer or default_scorer, o.max_batch, o.batch_wait_ms,
                                    o.queue_size, o.workers, on_batch=self.metrics.batch)
        self.store = ReviewStore(o.db, o.max_records) if o.db is not None else None
        self.reading = 0  # requests reading their body right now
        self.started = time.time()

    def close(self) -> None:
        """Stop the workers (waiting requests get 503) and close the review database."""
        self.batcher.close()
        if self.store is not None:
            self.store.close()

    def ready(self) -> tuple[bool, str]:
        """(ready, why not) for /readyz."""
        if not self.registry.ready or not self.registry.entries:
            return False, "no model is loaded"
        if not self.batcher.alive:
            return False, "the scoring workers are not running"
        return True, "ready"


class LimitsAndMetrics:
    """ASGI middleware: refuses bodies over the size limit (413) and times every request."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.service.options.max_request_bytes
        start = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        def finish() -> None:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.service.metrics.request(scope["method"], path, status[0],
                                         time.perf_counter() - start)

        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            too = error_response(413, f"the request body is larger than the limit of {limit:,} "
                                 "bytes (--max-request-bytes); send fewer or smaller images")
            await too(scope, receive, send_status)
            finish()
            return
        seen = [0]

        async def bounded_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise ApiError(413, f"the request body is larger than the limit of "
                                   f"{limit:,} bytes (--max-request-bytes)")
            return message

        try:
            await self.app(scope, bounded_receive, send_status)
        finally:
            finish()


def create_app(service: Service) -> FastAPI:
    """The FastAPI application of a service (closes the service at shutdown)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(service.close)

    app = FastAPI(title="patchcore", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service
    app.add_middleware(LimitsAndMetrics, service=service)
    install_error_handlers(app)
    key = service.options.api_key

    def require_key(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None:
            raise ApiError(401, "this service needs an API key: send X-API-Key: KEY or "
                           "Authorization: Bearer KEY", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "the API key is wrong", {"WWW-Authenticate": "Bearer"})

    guarded = [Depends(require_key)]

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Readiness: models loaded and scoring workers running (503 otherwise)."""
        ok, why = service.ready()
        return JSONResponse({"status": "ready" if ok else "not ready", "detail": why,
                             "models": sorted(service.registry.entries)},
                            status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=guarded)
    def metrics() -> PlainTextResponse:
        """Prometheus text metrics."""
        b = service.batcher
        text = service.metrics.render({
            "patchcore_queue_depth": ("Images waiting in the scoring queue.", b.depth),
            "patchcore_queue_admitted": ("Images admitted (decoding or queued).", b.reserved),
            "patchcore_queue_capacity": ("Images the queue admits at most.", b.queue_size),
            "patchcore_workers_busy": ("Scoring workers busy now.", b.busy),
            "patchcore_models": ("Models served.", len(service.registry.entries)),
            "patchcore_model_reloads_total": ("Models reloaded after a new save.",
                                              service.registry.reload_count),
            "patchcore_uptime_seconds": ("Seconds since start.", time.time() - service.started),
        })
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    def models() -> dict[str, Any]:
        """The served models: backbone, training summary, thresholds."""
        names = service.registry.names()
        return {"models": [service.registry.get(n).describe() for n in names
                           if n in service.registry.entries]}

    @app.post("/v1/models/{name}/predict", dependencies=guarded)
    async def predict(name: str, request: Request, maps: str = "none", overlay: bool = False,
                      review: bool = False) -> JSONResponse:
        """Score the images of the request with model `name`."""
        if maps not in MAP_FORMATS:
            raise ApiError(400, f"maps must be one of {', '.join(MAP_FORMATS)}, not "
                           f"{maps[:40]!r}")
        if review and service.store is None:
            raise ApiError(400, "review=true needs a review database (--db)")
        entry = await run_in_threadpool(service.registry.get, name)
        b = service.batcher
        if service.reading >= b.queue_size or b.reserved >= b.queue_size:
            raise QueueFull(b.retry_after())
        service.reading += 1
        try:
            files = await read_images(request, service.options.max_images)
        finally:
            service.reading -= 1
        with b.reserve(len(files)) as reservation:
            model = entry.model
            images = await run_in_threadpool(decode_all, files, model)
            future = b.submit(reservation, model, images)
        result = await asyncio.wrap_future(future)
        service.metrics.scored(entry.name, len(files))
        store = service.store if review else None
        answers = await run_in_threadpool(
            answer_all, entry.name, model, result, files, images, maps, overlay, store)
        return JSONResponse({
            "model": entry.name, "batch_images": result.batch_images,
            "queue_ms": round(result.queue_seconds * 1000, 2),
            "score_ms": round(result.score_seconds * 1000, 2), "predictions": answers})

    @app.get("/v1/reviews", dependencies=guarded)
    def reviews(sort: str = "created", order: str = "desc", limit: int = 200,
                reviewed: bool | None = None) -> dict[str, Any]:
        """Recorded predictions (no images), sorted by score, calibrated score or time."""
        if order not in ("asc", "desc"):
            raise ApiError(400, "order must be 'asc' or 'desc'")
        limit = max(1, min(limit, 5000))
        return {"reviews": need_store(service).rows(sort, order == "desc", limit, reviewed)}

    @app.get("/v1/reviews/export.csv", dependencies=guarded)
    def export_csv() -> Response:
        """The reviewed predictions as CSV."""
        return Response(need_store(service).export_csv(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="reviews.csv"'})

    @app.get("/v1/reviews/export.zip", dependencies=guarded)
    def export_zip() -> FileResponse:
        """The reviewed images in the dataset layout (train/good, test/<defect>), zipped."""
        store = need_store(service)
        fd, tmp = tempfile.mkstemp(prefix="patchcore-export-", suffix=".zip")
        try:
            with os.fdopen(fd, "wb") as fh:
                store.export_zip(fh)
        except BaseException:
            os.unlink(tmp)
            raise
        return FileResponse(tmp, media_type="application/zip", filename="reviewed_dataset.zip",
                            background=BackgroundTask(os.unlink, tmp))

    @app.get("/v1/reviews/{row_id}/{which}", dependencies=guarded)
    def review_blob(row_id: int, which: str) -> Response:
        """The recorded image (as uploaded) or its overlay PNG."""
        if which not in ("image", "overlay"):
            raise ApiError(404, f"no such review resource {which[:40]!r}; use image or overlay")
        found = need_store(service).blob(row_id, which)
        if found is None:
            raise ApiError(404, f"no recorded {which} with id {row_id}")
        data, suffix = found
        media = {".jpg": "image/jpeg", ".tif": "image/tiff"}.get(suffix, f"image/{suffix[1:]}")
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=60"})

    @app.post("/v1/reviews/{row_id}", dependencies=guarded)
    async def review_verdict(row_id: int, request: Request) -> dict[str, Any]:
        """Store a reviewer's verdict: {"verdict": "correct"|"wrong", "defect": name} or
        {"true_label": "good"|"anomalous"}."""
        body = await read_json(request)
        try:
            return need_store(service).review(row_id, body.get("verdict"),
                                              body.get("true_label"), body.get("defect"))
        except KeyError:
            raise ApiError(404, f"no recorded prediction with id {row_id}") from None

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        """The review page."""
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def need_store(service: Service) -> ReviewStore:
    """The review store, or a 404 saying how to enable it."""
    if service.store is None:
        raise ApiError(404, "reviews are off: start the service with a review database (--db)")
    return service.store


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (400 otherwise)."""
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def read_images(request: Request, max_images: int) -> list[tuple[str | None, bytes]]:
    """(file name, encoded bytes) of every image of a multipart or JSON request."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    files: list[tuple[str | None, bytes]] = []
    if kind == "multipart/form-data":
        async with request.form(max_files=max_images + 1, max_fields=16) as form:
            uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if len(uploads) > max_images:
                raise ApiError(413, f"more than {max_images} images in one request "
                               "(--max-images); split it")
            for up in uploads:
                files.append((up.filename, await up.read()))
    elif kind == "application/json":
        body = await read_json(request)
        items = body.get("images", [body] if "data" in body else None)
        if not isinstance(items, list):
            raise ApiError(400, 'send {"images": [{"data": BASE64, "filename": NAME}, ...]}')
        if len(items) > max_images:
            raise ApiError(413, f"more than {max_images} images in one request (--max-images); "
                           "split it")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("data"), str):
                raise ApiError(400, f"images[{i}] needs a base64 'data' string")
            try:
                data = base64.b64decode(item["data"], validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, f"images[{i}].data is not valid base64") from None
            name = item.get("filename")
            files.append((name if isinstance(name, str) else None, data))
    else:
        raise ApiError(415, "send the images as multipart/form-data files or as JSON "
                       '{"images": [{"data": BASE64}]}')
    if not files:
        raise ApiError(400, "the request holds no image: attach files (curl -F image=@x.png) or "
                       'send {"images": [{"data": BASE64}]}')
    return files


def describe(i: int, filename: str | None) -> str:
    """How an error names image i of a request."""
    shown = (filename or "")[:80]
    return f"image {i}" + (f" ({shown!r})" if shown else "")


def decode_all(files: list[tuple[str | None, bytes]], model: Any) -> list[Image.Image]:
    """Decode with the hardened decoder and check sizes with the model's preprocessor."""
    pre = model.preprocessor
    images = []
    for i, (filename, data) in enumerate(files):
        try:
            image = to_pil_image(data)
            pre.check_size(image.size, describe(i, filename))
        except DataError as exc:
            raise ApiError(400, f"{describe(i, filename)}: {exc}") from None
        images.append(image)
    return images


def answer_all(name: str, model: Any, result: Any, files: list[tuple[str | None, bytes]],
               images: list[Image.Image], maps: str, overlay: bool,
               store: ReviewStore | None) -> list[dict[str, Any]]:
    """Per-image answers of a scored job; with a store, each prediction is recorded."""
    pred, cal = result.prediction, model.calibration_
    answers = []
    for k, row in enumerate(result.rows):
        answer = {"filename": files[k][0],
                  **image_result(pred, row, cal, maps, images[k] if overlay else None)}
        if store is not None:
            answer["review_id"] = store.add(
                name, files[k][0], answer["score"], answer["calibrated_score"], answer["label"],
                answer["image_threshold"], files[k][1], overlay_png(pred, row, cal, images[k]))
        answers.append(answer)
    return answers


def install_error_handlers(app: FastAPI) -> None:
    """Every failure answered as `{"error": message, "status": code}`."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return error_response(503, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Closed)
    async def closed(request: Request, exc: Closed) -> JSONResponse:
        return error_response(503, str(exc), {"Retry-After": "5"})

    @app.exception_handler(UnknownModel)
    async def unknown_model(request: Request, exc: UnknownModel) -> JSONResponse:
        return error_response(404, str(exc))

    @app.exception_handler(DataError)
    async def data_error(request: Request, exc: DataError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(PatchCoreError)
    async def patchcore_error(request: Request, exc: PatchCoreError) -> JSONResponse:
        log.error("request failed: %s", exc)
        return error_response(500, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such route: {request.method} {request.url.path[:200]}"
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}"
                 for e in exc.errors()[:5]]
        return error_response(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}")
