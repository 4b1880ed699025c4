"""The HTTP side of the caption server: FastAPI routes, request checks, metrics and the page.

    POST /v1/captions   images as multipart files (field `images`) or base64 in JSON (`{"images": [...]}`),
                        with optional decoding settings; one caption per image, with times
    GET  /health        200 once the model is loaded, 503 before
    GET  /v1/model      what captions: the checkpoint, LLaMA and CLIP identities (as results record them),
                        each served captioner's under `captioners`
    POST /v1/chat/completions, GET /v1/models   OpenAI's Chat Completions API (chat.py)
    GET  /metrics       Prometheus text format (prometheus_client)
    GET  /              the page (static/index.html, served from here: no internet needed)

Every error is `{"error": "one sentence"}` with a 4xx or 5xx status (on the OpenAI routes, in
OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`). Images are checked (type,
truncation, Pillow's pixel limit, size) before they enter a batch, so a bad image fails only its
own request. With an API key every route but /health needs it (`Authorization: Bearer KEY`, or
`X-API-Key: KEY`; the page takes `?api_key=` and sends the header), compared in constant time.
"""

import asyncio
import base64
import binascii
import hmac
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import Callable, List, Optional, Tuple

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..data import open_rgb
from ..errors import UserError
from ..llama.decoding import Decoding, parse_number
from ..rerank import BestOf
from .batching import Batcher, Closed, QueuedRequest, QueueFull

STATIC = os.path.join(os.path.dirname(__file__), "static")
CLIENT_GONE = 499  # nginx's status for a client that closed the connection (counted, never seen)


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: Optional[dict] = None, param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.headers, self.param, self.code = status, message, headers or {}, param, code


class Limits(BaseModel):
    """What one request may ask for (the server's flags)."""

    max_images: int
    max_upload_bytes: int
    max_pixels: int
    max_gen_len: int
    max_beams: int


# The JSON request and the response, for the OpenAPI schema (and the JSON body's parsing); the
# settings are Decoding's fields, with their help and what the server adds to it.
SERVER_NOTES = {"max_gen_len": " Default and limit: the server's --max_gen_len.",
                "num_beams": " At most the server's --max_beams.",
                "temperature": " A sampled request's images are decoded in a batch of their own."}
CaptionRequest = create_model(
    "CaptionRequest",
    images=(List[str], Field(description="base64-encoded image files (JPEG, PNG, ...); a data: URL prefix is accepted")),
    model=(Optional[str], Field(None, description="the captioner, by the name serve gave it (GET /v1/model lists them); default: the first")),
    num_candidates=(Optional[int], Field(None, description="decode this many captions per image (sampled with temperature > 0, or the best beams) and answer with the one `rerank` picks; such a request is decoded in a batch of its own.")),
    rerank=(Optional[str], Field(None, description="with num_candidates > 1: logprob (default), clip (the captioner's own CLIP-S) or mbr (consensus: mean CIDEr-D against the other candidates).")),
    candidates=(Optional[bool], Field(None, description="with num_candidates > 1: list each image's candidates (caption, logprob, mbr, clip_s) beside its caption.")),
    **{f.name: (Optional[f.type], Field(None, description=f.metadata["help"] + SERVER_NOTES.get(f.name, "")))
       for f in fields(Decoding)})


class CandidateOut(BaseModel):
    caption: str
    logprob: float = Field(description="its mean token log-probability (the end token included when it ended)")
    mbr: float = Field(description="its mean CIDEr-D against the image's other candidates")
    clip_s: Optional[float] = Field(None, description="its CLIP-S by the captioner's own CLIP (when it reads text)")


class CaptionOut(BaseModel):
    caption: str
    candidates: Optional[List[CandidateOut]] = Field(None, description="with num_candidates > 1 and candidates: true, every candidate")
    decode_s: float = Field(description="seconds to encode and decode the batch this image was in (--decoder continuous: from its request taking slots to its last caption)")
    batch_images: int = Field(description="images in that batch, from every request in it (--decoder continuous: the most slots busy while its request was decoded)")


class CaptionResponse(BaseModel):
    captions: List[CaptionOut]
    captioner: str = Field(description="the captioner that wrote them, by its name (GET /v1/model lists them)")
    queue_s: float = Field(description="seconds waiting for a batch")
    total_s: float = Field(description="seconds from the request's arrival to its answer")


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llama_caption_requests", "caption requests answered, by HTTP status", ["status"], registry=r)
        self.images = Counter("llama_caption_images", "images captioned", registry=r)
        self.batches = Histogram("llama_caption_batch_images", "images per decoded batch",
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue = Gauge("llama_caption_queue_images", "images waiting for a batch", registry=r)
        self.in_flight = Gauge("llama_caption_requests_in_flight", "caption requests received and not yet answered", registry=r)
        self.latency = Histogram("llama_caption_request_seconds", "caption request latency, arrival to answer",
                                 buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 25, 60), registry=r)
        # --decoder continuous: its slots and steps.
        self.slots_busy = Gauge("llama_caption_slots_busy", "continuous decoder: slots holding an image", registry=r)
        self.steps = Counter("llama_caption_decode_steps", "continuous decoder: steps run", registry=r)
        self.step_tokens = Histogram("llama_caption_step_tokens", "continuous decoder: tokens decoded per step",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.by_captioner = Counter("llama_caption_captioner_images", "images captioned, by captioner (serve's names)",
                                    ["captioner"], registry=r)

    def captioned(self, captioner: str, n: int) -> None:
        self.by_captioner.labels(captioner).inc(n)

    def batch(self, n: int) -> None:
        self.batches.observe(n)
        self.images.inc(n)

    def step(self, tokens: int, busy_after: int) -> None:
        """A continuous-decoder step that decoded `tokens` tokens, `busy_after` slots busy after it."""
        self.steps.inc()
        self.step_tokens.observe(tokens)
        self.slots_busy.set(busy_after)


BEST_OF_FIELDS = ("num_candidates", "rerank", "candidates")


def check_decoding(values: dict, limits: Limits) -> Decoding:
    """A request's decoding settings, defaults filled in, checked as `caption` checks its flags
    (llama/decoding.py) within the server's limits; ApiError(400) naming a bad one."""
    unknown = sorted(set(values) - set(Decoding.names()) - {"images"} - set(BEST_OF_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}: the settings are "
                            f"{', '.join(Decoding.names() + BEST_OF_FIELDS)}")
    caps = {"max_gen_len": (limits.max_gen_len, "the server's --max_gen_len"),
            "num_beams": (limits.max_beams, "the server's --max_beams")}
    try:
        return Decoding.from_values({k: v for k, v in values.items() if k not in BEST_OF_FIELDS},
                                    {"max_gen_len": limits.max_gen_len}, caps)
    except UserError as e:
        raise ApiError(400, str(e)) from None


def check_best_of(values: dict, decoding: Decoding) -> Tuple[BestOf, bool]:
    """A request's candidates (num_candidates, rerank: rerank.py) and whether the answer lists
    them (candidates: true); ApiError(400) naming a bad one."""
    try:
        n = parse_number("num_candidates", int, values.get("num_candidates"))
        best_of = BestOf(1 if n is None else n, values.get("rerank") or "logprob").check(decoding, str)
    except UserError as e:
        raise ApiError(400, str(e)) from None
    shown = values.get("candidates", False)
    if isinstance(shown, str):
        shown = {"true": True, "1": True, "false": False, "0": False, "": False}.get(shown.strip().lower(), shown)
    if not isinstance(shown, bool):
        raise ApiError(400, f"candidates must be true or false, got {json.dumps(shown)}")
    if shown and not best_of.active:
        raise ApiError(400, "candidates lists the candidates of num_candidates > 1: give num_candidates")
    return best_of, shown


def decode_image(data: bytes, name: str, limits: Limits, preprocess) -> torch.Tensor:
    """An uploaded file's pixels as the captioner's encoder takes them; ApiError for a bad one."""
    if not data:
        raise ApiError(400, f"image {name} is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
        if w * h > limits.max_pixels:
            raise ApiError(413, f"image {name} is {w}x{h} = {w * h} pixels, over the server's --max_pixels {limits.max_pixels}")
        return preprocess(open_rgb(io.BytesIO(data)))
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"image {name} is a decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
        kind = "not an image Pillow can read" if isinstance(e, Image.UnidentifiedImageError) else f"unreadable ({e})"
        raise ApiError(400, f"image {name} is {kind}".rstrip(".")) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"the upload is over the server's --max_upload_mb {limit / 2 ** 20:g} MB")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(CLIENT_GONE, "the client went away before its upload ended") from None
    return b"".join(chunks)


async def parse_multipart(request: Request, body: bytes):
    """(files, settings) of a multipart body: files in the field `images`, settings as fields."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartParser

    boundary = ""
    for param in request.headers.get("content-type", "").split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise ApiError(400, "malformed multipart body (the Content-Type names no boundary)")
    if not body.rstrip(b"\r\n").endswith(b"--" + boundary.encode("latin-1", "replace") + b"--"):
        raise ApiError(400, "malformed multipart body (it does not end with its closing boundary: cut short?)")

    async def replay():  # the form parser reads the body we already hold
        yield body

    try:
        # The body's size is bounded already; the file count is checked against --max_images after.
        form = await MultiPartParser(request.headers, replay(), max_files=100_000, max_fields=1_000).parse()
    except Exception as e:  # python-multipart and Starlette raise several kinds for a malformed body
        raise ApiError(400, f"malformed multipart body ({getattr(e, 'message', None) or e})") from None
    files, settings = [], {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "images":
                raise ApiError(400, f"upload files as the field 'images', not {key!r}")
            files.append((value.filename or f"#{len(files) + 1}", await value.read()))
        elif key == "images":
            raise ApiError(400, "the field 'images' must hold files")
        elif key in settings:
            raise ApiError(400, f"the field {key!r} is given twice: give each setting once")
        else:
            settings[key] = value
    return files, settings


def decode_base64(text: str, name: str) -> bytes:
    """An image sent as base64: a data: URL prefix, line breaks, missing padding and the URL-safe
    alphabet are all taken."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    text += "=" * (-len(text) % 4)
    try:
        urlsafe = "-" in text or "_" in text
        return base64.b64decode(text, altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"image {name} is not valid base64") from None


def parse_json(body: bytes):
    """(files, settings) of a JSON body: {"images": ["<base64>", ...], settings...}."""
    try:
        data = json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"malformed JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ApiError(400, 'the JSON body must be an object: {"images": ["<base64>", ...], ...}')
    images = data.pop("images", None)
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise ApiError(400, 'the JSON body needs "images": a list of base64 strings')
    return [(f"#{i + 1}", decode_base64(text, f"#{i + 1}")) for i, text in enumerate(images)], data


async def parse_request(request: Request, limits: Limits):
    """(list of (name, bytes), settings dict) from a multipart or JSON request."""
    body = await read_body(request, limits.max_upload_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return await parse_multipart(request, body)
    if kind == "application/json":
        return parse_json(body)
    if kind == "application/x-www-form-urlencoded":  # a form with no file fields: only settings
        from urllib.parse import parse_qsl

        settings = dict(parse_qsl(body.decode("utf-8", "replace")))
        if "images" in settings:
            raise ApiError(400, "the field 'images' must hold files: send multipart/form-data")
        return [], settings
    raise ApiError(415, "send multipart/form-data (files in the field 'images') or application/json (base64 images)")


def create_app(batcher: Batcher, limits: Limits, captioners: Callable[[], dict], model_info: Callable[[], dict],
               ready: Callable[[], bool], metrics: Metrics, api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI app. `captioners` (name -> opening.OpenedCaptioner, the default first),
    `model_info` and `ready` are read when called: the model loads while the server already
    answers /health with 503."""
    from .chat import add_openai_routes

    # Images are decoded by two threads, not by the event loop's pool of forty: more threads only
    # fight the decoding loop for the interpreter lock.
    readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="read-images")
    app = FastAPI(title="llama_caption", version="1",
                  description="Captions from a frozen CLIP and a frozen LLaMA joined by a trained prefix projection. "
                              "/docs fetches Swagger UI from a CDN (it needs the internet); /openapi.json does not.",
                  redoc_url=None)
    add_error_handlers(app)
    add_guards(app, metrics, api_key)
    add_info_routes(app, batcher, limits, model_info, ready, metrics)
    add_caption_route(app, batcher, limits, captioners, ready, readers)
    add_openai_routes(app, batcher, limits, captioners, ready, readers)
    return app


OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")
OPENAI_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "server_error", 500: "server_error", 499: "invalid_request_error"}


def error(status: int, message: str, headers: Optional[dict] = None, path: str = "", param: Optional[str] = None,
          code: Optional[str] = None) -> JSONResponse:
    """Every error the server sends: {"error": one sentence}; on the OpenAI routes (`path`),
    OpenAI's shape {"error": {"message", "type", "param", "code"}}, which its clients read."""
    if path.startswith(OPENAI_PATHS):
        body = {"message": message, "type": OPENAI_TYPES.get(status, "invalid_request_error"), "param": param,
                "code": code}
        return JSONResponse({"error": body}, status_code=status, headers=headers)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Our errors, Starlette's and FastAPI's validation errors, all as {"error": ...}."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error(e.status, e.message, e.headers, request.url.path, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error(e.status_code, str(e.detail), getattr(e, "headers", None), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error(400, f"{where}: {first.get('msg', 'invalid request')}", path=request.url.path)


def add_guards(app: FastAPI, metrics: Metrics, api_key: Optional[str]) -> None:
    """The API key check, and (outermost) the count of every answer to a caption request."""

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("x-api-key") or ""
            bearer = request.headers.get("authorization", "")
            if bearer.lower().startswith("bearer "):
                given = bearer[7:].strip()
            if request.url.path in ("/", "/favicon.ico") and not given:
                given = request.query_params.get("api_key", "")
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error(401, "a valid API key is needed: send 'Authorization: Bearer KEY' (the server's --api_key)",
                             {"WWW-Authenticate": "Bearer"}, request.url.path, code="invalid_api_key")
        return await call_next(request)

    # Outermost: every answer to a caption request is counted, the refused key and the client
    # that went away included.
    @app.middleware("http")
    async def _count(request: Request, call_next):
        if request.url.path not in ("/v1/captions", "/v1/chat/completions"):
            return await call_next(request)
        arrived = time.monotonic()
        status = 500
        metrics.in_flight.inc()
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(str(status)).inc()
            metrics.latency.observe(time.monotonic() - arrived)


def add_info_routes(app: FastAPI, batcher: Batcher, limits: Limits, model_info: Callable[[], dict],
                    ready: Callable[[], bool], metrics: Metrics) -> None:
    """/health, /v1/model, /metrics, the page and its icon."""

    @app.api_route("/health", methods=["GET", "HEAD"], summary="200 once the model is loaded (503 while it loads)")
    async def health():
        if not ready():
            return error(503, "the model is still loading", {"Retry-After": "5"})
        return {"status": "ok", "queue_images": batcher.depth(), "requests_in_flight": int(metrics.in_flight._value.get())}

    @app.get("/v1/model", summary="what captions: checkpoint, LLaMA, CLIP and default decoding, as results files record them")
    async def model():
        if not ready():
            return error(503, "the model is still loading", {"Retry-After": "5"})
        return dict(model_info(), limits=limits.model_dump())

    @app.get("/metrics", summary="Prometheus metrics (text format)")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return FileResponse(os.path.join(STATIC, "favicon.svg"), media_type="image/svg+xml")


def pick_captioner(captioners: dict, name, status: int = 400, field: str = "model") -> tuple:
    """(name, opening.OpenedCaptioner) a request names (`name` None or "": the default, the first)."""
    if name in (None, ""):
        return next(iter(captioners.items()))
    if not isinstance(name, str) or name not in captioners:
        raise ApiError(status, f"unknown {field} {name!r}: this server serves {', '.join(captioners)}",
                       param=field, code="model_not_found")
    return name, captioners[name]


async def caption_files(batcher: Batcher, limits: Limits, readers: ThreadPoolExecutor, files: list,
                        decoding: Decoding, name: str, opened, best_of: BestOf = BestOf()) -> dict:
    """Decode and check a request's image files (name, bytes) for its captioner, queue them and
    wait for their batch: batching.run_batch's answer (captions, tokens, times). ApiError for a
    bad image, a full queue, a server shutting down, or a batch that failed. The request's
    arrival (Batcher.arrive, by the caller) ends here, whatever happens."""
    preprocess = opened.preprocess
    try:
        pixels = await asyncio.get_running_loop().run_in_executor(
            readers, lambda: torch.stack([decode_image(data, label, limits, preprocess) for label, data in files]))
    except BaseException:
        batcher.arrived()
        raise
    try:
        # submit ends the request's arrival (Batcher.arrive), whether it takes it or not
        future = batcher.submit(QueuedRequest(pixels, decoding, name, opened.captioner.prefix_len, best_of),
                                was_arriving=True)
    except QueueFull:
        raise ApiError(503, f"the queue is full ({batcher.max_queue} images, the server's --max_queue): retry shortly",
                       {"Retry-After": "1"}) from None
    except Closed:
        raise ApiError(503, "the server is shutting down", {"Retry-After": "5"}) from None
    try:
        return await asyncio.wrap_future(future)
    except Exception as e:
        raise ApiError(500, f"captioning failed: {type(e).__name__}: {e}") from None


def add_caption_route(app: FastAPI, batcher: Batcher, limits: Limits, captioners: Callable[[], dict],
                      ready: Callable[[], bool], readers: ThreadPoolExecutor) -> None:
    """POST /v1/captions: read and check the request, decode its images, queue it, answer it."""
    body_schema = {
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["images"], "properties": dict(
                {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                **{k: v for k, v in CaptionRequest.model_json_schema()["properties"].items() if k != "images"})}},
            "application/json": {"schema": CaptionRequest.model_json_schema()},
        }}}

    @app.post("/v1/captions", response_model=CaptionResponse, response_model_exclude_none=True, openapi_extra=body_schema,
              summary="caption one or more images (multipart files or base64 JSON)",
              responses={400: {"description": "bad image or setting: {\"error\": ...}"},
                         413: {"description": "upload, image or pixel count too large"},
                         503: {"description": "queue full or shutting down (Retry-After)"}})
    async def captions(request: Request):
        arrived = time.monotonic()
        batcher.arrive()
        submitted = False
        try:
            if not ready():
                raise ApiError(503, "the model is still loading", {"Retry-After": "5"})
            files, settings = await parse_request(request, limits)
            name, opened = pick_captioner(captioners(), settings.pop("model", None))
            if not files:
                raise ApiError(400, "no images: send at least one file in the field 'images'")
            if len(files) > limits.max_images:
                raise ApiError(400, f"{len(files)} images in one request, over the server's --max_images {limits.max_images}")
            decoding = check_decoding(settings, limits)
            best_of, shown = check_best_of(settings, decoding)
            submitted = True
            out = await caption_files(batcher, limits, readers, files, decoding, name, opened, best_of)
            each = [{"caption": c, "decode_s": round(out["decode_s"], 4), "batch_images": out["batch_images"]}
                    for c in out["captions"]]
            if shown:
                for row, cands in zip(each, out["candidates"]):
                    row["candidates"] = cands
            return {"captions": each,
                    "captioner": name, "queue_s": round(out["queue_s"], 4),
                    "total_s": round(time.monotonic() - arrived, 4)}
        finally:
            if not submitted:
                batcher.arrived()
