"""The exported VAE over HTTP with Ray Serve: `vae-generate serve --model ARTIFACT_DIR`.

Routes (JSON in and out unless said; every error is a 4xx with `{"error": "..."}`):

    POST /v1/decode   {"latents": [[...], ...], "format": "json" | "png"}
                      -> {"images": N x 28 x 28 floats in [0, 1]}, or a PNG grid
    POST /v1/sample   {"n": 16, "seed": 0, "temperature": 1.0, "format": "png" | "json"}
    POST /v1/encode   a 28x28 PNG (Content-Type: image/png), or {"images": N x 28 x 28 in [0, 1]}
                      -> {"z_mean": [...], "z_log_var": [...]}
    GET  /v1/model    the model card's facts, and which artifact and run are served
    GET  /v1/stats    how many requests each onnxruntime decode call carried
    GET  /healthz     {"status": "ok"}

Concurrent decode and sample requests are coalesced into one onnxruntime call by Ray
Serve's request batching (`@serve.batch`, waiting at most `batch_wait_s` (2 ms) for company).
Limits: the request body (`max_body_bytes`, and `body_timeout_s` for it to arrive: a
client that stalls mid-body gets a JSON 408 before Serve's own request timeout, whose
408 is plain text), rows per request (`max_rows`), and Serve's request timeout. `Limits`
reaches each replica as the deployment's `user_config`, so `reconfigure` applies it,
batching included, and a new one applies without a restart.
The same hook swaps the model: a `user_config` whose `model` names another artifact
directory loads it, verified, beside the one serving, then takes it in one assignment
(requests in flight finish on the old one); deploy.serve_process does this when the
pointer it follows (`--model RUNS/champion`) moves.
This module and deploy.serve_process (which starts Ray, runs this application and stops
it) are the only parts of `deploy` that import Ray (install the `serve` extra for them).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types at
# run time (a `Request` annotation that is a string is taken for a query parameter).
import asyncio
import io
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.artifact import IMAGE_SHAPE, MODEL_CARD_JSON, ArtifactError
from deploy.follow import served_from
from deploy.generator import Generator
from deploy.png import write_grid

APP_NAME = "vae"
REQUEST_TIMEOUT_S = 30  # Serve's own: past it, its ingress answers a plain-text 408
CARD_FACTS = (
    "name",
    "version",
    "created",
    "latent_dim",
    "image_shape",
    "architecture",
    "metrics",
    "data",
    "execution_providers",
)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB: 256 latents of 64 floats as JSON are ~200 kB
    max_rows: int = 256  # latents, images or samples in one request
    max_batch_size: int = 64  # requests coalesced into one decode call (1: no batching)
    batch_wait_s: float = 0.002  # how long a batch waits for more requests (2 ms: see docs/benchmarks.md)
    body_timeout_s: float = 10.0  # for the whole body to arrive; under Serve's REQUEST_TIMEOUT_S

    def __post_init__(self) -> None:
        if not 0 < self.body_timeout_s < REQUEST_TIMEOUT_S:
            raise ValueError(f"the body timeout must be in (0, {REQUEST_TIMEOUT_S}) s, got {self.body_timeout_s:g}")


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


app = FastAPI(title="vae-generate", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(BadRequest)
async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code)


def model_facts(artifact_dir: Path, generator: Generator) -> dict[str, Any]:
    try:
        card = json.loads((artifact_dir / MODEL_CARD_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        card = {}
    facts = {key: card[key] for key in CARD_FACTS if key in card}
    facts.update(latent_dim=generator.latent_dim, providers=generator.providers, class_names=generator.class_names)
    facts["served"] = served_from(artifact_dir)
    return facts


async def read_body(request: Request, limits: Limits) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise BadRequest(f"request body of {declared} bytes is over the limit of {limits.max_body_bytes}", 413)

    async def whole_body() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise BadRequest(f"request body is over the limit of {limits.max_body_bytes} bytes", 413)
        return bytes(body)

    try:
        return await asyncio.wait_for(whole_body(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise BadRequest(f"the request body did not arrive within {limits.body_timeout_s:g} s", 408) from None


async def read_json(request: Request, limits: Limits) -> dict[str, Any]:
    body = await read_body(request, limits)
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except ValueError as exc:
        raise BadRequest(f"the body is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def float_array(body: dict[str, Any], key: str, item_shape: tuple[int, ...], max_rows: int) -> np.ndarray:
    """body[key] as a float32 array of shape (N, *item_shape), 1 <= N <= max_rows, finite."""
    if key not in body:
        raise BadRequest(f"missing {key!r}")
    try:
        array = np.asarray(body[key], dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise BadRequest(
            f"{key!r} must be a nested list of numbers of shape (N, {', '.join(map(str, item_shape))})"
        ) from exc
    if array.ndim == len(item_shape):
        array = array[None]
    if array.shape[1:] != item_shape:
        raise BadRequest(f"{key!r} must have shape (N, {', '.join(map(str, item_shape))}), got {tuple(array.shape)}")
    if not 1 <= len(array) <= max_rows:
        raise BadRequest(f"{key!r} must hold 1 to {max_rows} rows, got {len(array)}")
    if not np.all(np.isfinite(array)):
        raise BadRequest(f"{key!r} holds NaN or Inf")
    return array


def integer(body: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{key!r} must be an integer in [{low}, {high}], got {value!r}")
    return value


def number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{key!r} must be a finite number, got {value!r}")
    return float(value)


def image_response(images: np.ndarray, form: Any) -> Response:
    if form == "png":
        buffer = io.BytesIO()
        write_grid(buffer, [images], len(images))
        return Response(buffer.getvalue(), media_type="image/png")
    if form == "json":
        return JSONResponse({"images": np.round(images[..., 0].astype(np.float64), 7).tolist()})
    raise BadRequest(f"format must be 'json' or 'png', got {form!r}")


def read_png(data: bytes) -> np.ndarray:
    """A 28x28 PNG (any mode; converted to grey) -> (1, 28, 28) float32 in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise BadRequest(f"expected a PNG image, got {image.format}", 415)
            if image.size != IMAGE_SHAPE[:2][::-1]:
                raise BadRequest(
                    f"the PNG must be {IMAGE_SHAPE[1]}x{IMAGE_SHAPE[0]} pixels, got {image.size[0]}x{image.size[1]}"
                )
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except Image.DecompressionBombError as exc:
        # Pillow refuses on open any image of over twice its MAX_IMAGE_PIXELS (a few hundred
        # bytes can declare 20000x20000): a request too large, not a server error.
        size = f"{IMAGE_SHAPE[1]}x{IMAGE_SHAPE[0]}"
        raise BadRequest(f"the PNG is far larger than {size} pixels ({str(exc).split(',')[0]})", 413) from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadRequest("the body is not a readable PNG image", 415) from exc
    return pixels[None]


# The service class comes after every helper it calls: Serve captures the class (and the
# module globals its methods see) when the decorators run.
@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class VAEService:
    def __init__(self, artifact_dir: str):
        self.limits = Limits()
        self.artifact_dir = artifact_dir
        self.generator = Generator(artifact_dir, providers="auto")
        self.card = model_facts(Path(artifact_dir), self.generator)
        self.batch_sizes: Counter[int] = Counter()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's `user_config` hook: the limits, and with them the request batching; and,
        when `model` names another artifact, that model."""
        config = dict(config)
        model = config.pop("model", None)
        if model is not None and model != self.artifact_dir:
            generator = Generator(model, providers="auto")  # verified before it serves
            card = model_facts(Path(model), generator)
            # One assignment each: a request sees the old model or the new, never half.
            self.generator, self.card, self.artifact_dir = generator, card, model
        self.limits = Limits(**config)
        self.decode_batched.set_max_batch_size(self.limits.max_batch_size)
        self.decode_batched.set_batch_wait_timeout_s(self.limits.batch_wait_s)

    @serve.batch
    async def decode_batched(self, latents: list[np.ndarray]) -> list[np.ndarray]:
        """One onnxruntime call for every request in the batch."""
        self.batch_sizes[len(latents)] += 1
        images = await asyncio.to_thread(self.generator.decode, np.concatenate(latents))
        return np.split(images, np.cumsum([len(z) for z in latents])[:-1])

    @app.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    def model(self) -> dict[str, Any]:
        return self.card

    @app.get("/v1/stats")
    def stats(self) -> dict[str, Any]:
        return {
            "replica_pid": os.getpid(),  # a restarted replica has another
            "decode_calls_by_requests": {str(k): v for k, v in sorted(self.batch_sizes.items())},
        }

    @app.post("/v1/decode")
    async def decode(self, request: Request) -> Response:
        body = await read_json(request, self.limits)
        latents = float_array(body, "latents", (self.generator.latent_dim,), self.limits.max_rows)
        images = await self.decode_batched(latents)
        return image_response(images, body.get("format", "json"))

    @app.post("/v1/sample")
    async def sample(self, request: Request) -> Response:
        body = await read_json(request, self.limits)
        n = integer(body, "n", 16, 1, self.limits.max_rows)
        seed = integer(body, "seed", None, 0, 2**63 - 1)
        temperature = number(body, "temperature", 1.0)
        if not 0 < temperature <= 10:
            raise BadRequest(f"temperature must be in (0, 10], got {temperature}")
        z = (np.random.default_rng(seed).standard_normal((n, self.generator.latent_dim)) * temperature).astype(
            np.float32
        )
        images = await self.decode_batched(z)
        return image_response(images, body.get("format", "png"))

    @app.post("/v1/encode")
    async def encode(self, request: Request) -> dict[str, Any]:
        if request.headers.get("content-type", "").split(";")[0].strip() == "image/png":
            images = read_png(await read_body(request, self.limits))
        else:
            body = await read_json(request, self.limits)
            images = float_array(body, "images", IMAGE_SHAPE[:2], self.limits.max_rows)
            if images.min() < 0 or images.max() > 1:
                raise BadRequest("images must be in [0, 1] (divide 8-bit pixels by 255)")
        z_mean, z_log_var = await asyncio.to_thread(self.generator.encode, images)
        return {"z_mean": z_mean.tolist(), "z_log_var": z_log_var.tolist()}


def build(artifact_dir: str | Path, replicas: int = 1, limits: Limits | None = None, model: str | Path | None = None):
    """The Serve application, ready for `serve.run`. The artifact is checked here first,
    so that a bad one fails at once with ArtifactError rather than in a replica.

    `model`, another artifact directory, is what the replicas serve instead of
    `artifact_dir` (the one they started with): run again with the same `artifact_dir`,
    the application changes only its `user_config`, and Serve applies that to the
    running replicas through `reconfigure`, without restarting them."""
    model = Path(model or artifact_dir).resolve()
    Generator(model, providers="cpu", parallel=1).close()
    limits = limits or Limits()
    options = {"num_replicas": replicas, "user_config": {**asdict(limits), "model": str(model)}}
    return VAEService.options(**options).bind(str(Path(artifact_dir).resolve()))


def from_args(args: dict[str, str]):
    """Application builder for a Serve config file or KubeRay `RayService`
    (`import_path: deploy.serve:from_args`, `args: {model: /model, replicas: "2"}`)."""
    names = {field for field in Limits.__dataclass_fields__}
    unknown = set(args) - names - {"model", "replicas"}
    if "model" not in args or unknown:
        raise ValueError(
            f"deploy.serve:from_args takes model (required), replicas and {sorted(names)}; got {sorted(args)}"
        )
    kinds = {name: type(getattr(Limits(), name)) for name in names}
    limits = Limits(**{name: kinds[name](value) for name, value in args.items() if name in names})
    return build(args["model"], int(args.get("replicas", 1)), limits)


__all__ = ["APP_NAME", "ArtifactError", "Limits", "build", "from_args"]
