"""The exported VAE over HTTP with Ray Serve: `vae-generate serve --model ARTIFACT_DIR`.

Routes (JSON in and out unless said; every error is a 4xx with `{"error": "..."}`):

    POST /v1/decode   {"latents": [[...], ...], "format": "json" | "png"}
                      -> {"images": N x 28 x 28 floats in [0, 1]}, or a PNG grid
    POST /v1/sample   {"n": 16, "seed": 0, "temperature": 1.0, "format": "png" | "json"}
    POST /v1/encode   a 28x28 PNG (Content-Type: image/png), or {"images": N x 28 x 28 in [0, 1]}
                      -> {"z_mean": [...], "z_log_var": [...]}
    GET  /v1/model    the model card's facts
    GET  /v1/stats    how many requests each onnxruntime decode call carried
    GET  /healthz     {"status": "ok"}

Concurrent decode and sample requests are coalesced into one onnxruntime call by Ray
Serve's request batching (`@serve.batch`, waiting at most `batch_wait_s` (2 ms) for company).
Limits: the request body (`max_body_bytes`), rows per request (`max_rows`), and Serve's
request timeout. This module is the only part of `deploy` that imports Ray; `deploy`
itself never does (install the `serve` extra for it).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types at
# run time (a `Request` annotation that is a string is taken for a query parameter).
import asyncio
import io
import json
import math
import os
import shutil
import signal
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.artifact import IMAGE_SHAPE, ArtifactError
from deploy.generator import Generator
from deploy.png import write_grid

MODEL_CARD_JSON = "model_card.json"
APP_NAME = "vae"
CARD_FACTS = ("name", "version", "created", "latent_dim", "image_shape", "architecture", "metrics", "data", "execution_providers")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB: 256 latents of 64 floats as JSON are ~200 kB
    max_rows: int = 256  # latents, images or samples in one request
    max_batch_size: int = 64  # requests coalesced into one decode call (1: no batching)
    batch_wait_s: float = 0.002  # how long a batch waits for more requests (2 ms: see docs/benchmarks.md)


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
    return facts


async def read_body(request: Request, limits: Limits) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise BadRequest(f"request body of {declared} bytes is over the limit of {limits.max_body_bytes}", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise BadRequest(f"request body is over the limit of {limits.max_body_bytes} bytes", 413)
    return bytes(body)


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
        raise BadRequest(f"{key!r} must be a nested list of numbers of shape (N, {', '.join(map(str, item_shape))})") from exc
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
                raise BadRequest(f"the PNG must be {IMAGE_SHAPE[1]}x{IMAGE_SHAPE[0]} pixels, got {image.size[0]}x{image.size[1]}")
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadRequest("the body is not a readable PNG image", 415) from exc
    return pixels[None]


# The service class comes after every helper it calls: Serve captures the class (and the
# module globals its methods see) when the decorators run.
@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class VAEService:
    def __init__(self, artifact_dir: str, limits: dict[str, Any]):
        self.limits = Limits(**limits)
        self.generator = Generator(artifact_dir, providers="auto")
        self.card = model_facts(Path(artifact_dir), self.generator)
        self.batch_sizes: Counter[int] = Counter()
        self.decode_batched.set_max_batch_size(self.limits.max_batch_size)
        self.decode_batched.set_batch_wait_timeout_s(self.limits.batch_wait_s)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
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
        z = (np.random.default_rng(seed).standard_normal((n, self.generator.latent_dim)) * temperature).astype(np.float32)
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


def build(artifact_dir: str | Path, replicas: int = 1, limits: Limits | None = None):
    """The Serve application, ready for `serve.run`. The artifact is checked here first,
    so that a bad one fails at once with ArtifactError rather than in a replica."""
    Generator(artifact_dir, providers="cpu", parallel=1).close()
    limits = limits or Limits()
    return VAEService.options(num_replicas=replicas).bind(str(Path(artifact_dir).resolve()), asdict(limits))


def from_args(args: dict[str, str]):
    """Application builder for a Serve config file or KubeRay `RayService`
    (`import_path: deploy.serve:from_args`, `args: {model: /model, replicas: "2"}`)."""
    names = {field for field in Limits.__dataclass_fields__}
    unknown = set(args) - names - {"model", "replicas"}
    if "model" not in args or unknown:
        raise ValueError(f"deploy.serve:from_args takes model (required), replicas and {sorted(names)}; got {sorted(args)}")
    kinds = {name: type(getattr(Limits(), name)) for name in names}
    limits = Limits(**{name: kinds[name](value) for name, value in args.items() if name in names})
    return build(args["model"], int(args.get("replicas", 1)), limits)


def choose_ingress(ingress: str) -> str:
    """"haproxy" or "python": Ray Serve's HTTP ingress. HAProxy (Ray >= 2.55, with direct
    data-plane calls to the replicas) carries 2-3x the requests of Serve's Python proxy
    on 2 cores (docs/benchmarks.md); "auto" takes it when `haproxy` is installed. Set
    before Ray starts: the proxy and replicas read it from their environment."""
    if ingress not in ("auto", "haproxy", "python"):
        raise ValueError(f"ingress must be auto, haproxy or python, got {ingress!r}")
    if ingress == "auto":
        ingress = "haproxy" if shutil.which("haproxy") else "python"
    if ingress == "haproxy" and not shutil.which("haproxy"):
        raise ValueError("--ingress haproxy: no haproxy on PATH (apt-get install haproxy)")
    flag = "1" if ingress == "haproxy" else "0"
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = flag
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = flag
    return ingress


# After Ray's shutdown, how long no new HAProxy of ours may appear before serving stops.
HAPROXY_QUIET_S = 3.0


def serve_forever(
    artifact_dir: Path, host: str, port: int, replicas: int, limits: Limits, address: str | None, ingress: str = "auto"
) -> None:
    """Start Ray (or join `address`), run the application on host:port, and block until
    interrupted; then shut Serve down."""
    import time

    import ray

    application = build(artifact_dir, replicas, limits)
    ingress = choose_ingress(ingress)
    # "local": a new Ray of our own, never one that happens to run on this machine.
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
    # After ray.init, which sets its own: SIGTERM (kill, docker stop, systemd) stops serving
    # exactly as Ctrl-C does, through the cleanup below: service managers send it, and a
    # script's background job, which Ctrl-C cannot reach, ignores SIGINT.
    signal.signal(signal.SIGTERM, _interrupt)
    node_id = ray.get_runtime_context().get_node_id()
    try:
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": 30})
        serve.run(application, name=APP_NAME, route_prefix="/")
        print(f"serving {artifact_dir} on http://{host}:{port} ({replicas} replica{'s' * (replicas != 1)}, "
              f"{ingress} ingress); Ctrl-C or SIGTERM stops", flush=True)
        while True:
            time.sleep(3600)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        # On a cluster of its own the application goes with Ray (Serve's own shutdown
        # drains for half a minute); on a shared cluster only this application is removed.
        if address:
            serve.delete(APP_NAME)
            shutdown_ray_ignoring_sigterm()
        else:
            ingress_processes = own_haproxy(node_id)
            shutdown_ray_ignoring_sigterm()
            stop_own_haproxy(node_id, ingress_processes)


def shutdown_ray_ignoring_sigterm(every_s: float = 0.005) -> None:
    """ray.shutdown() with SIGTERM kept ignored: Ray's core resets SIGTERM to its default
    action (terminate) about 0.3 s into its shutdown, which takes 1.4 s here, and only the
    main thread may set a handler. So the shutdown runs in a thread while this one puts
    the ignore back every `every_s`."""
    import threading

    import ray

    failure: list[BaseException] = []

    def shutdown() -> None:
        try:
            ray.shutdown()
        except BaseException as exc:  # raised again below, in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=shutdown, name="ray-shutdown")
    thread.start()
    while thread.is_alive():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        thread.join(every_s)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if failure:
        raise failure[0]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_own_haproxy(node_id: str, earlier: list, quiet_s: float = HAPROXY_QUIET_S) -> None:
    """Stop `earlier` and every HAProxy of this node, then keep looking until none has
    come for `quiet_s` (at most 10x that): a proxy actor can outlive ray.shutdown() by a
    moment and start one more HAProxy (a graceful reload)."""
    import time

    stop_processes(list({p.pid: p for p in earlier + own_haproxy(node_id)}.values()))
    quiet_since = started = time.monotonic()
    while time.monotonic() - quiet_since < quiet_s and time.monotonic() - started < 10 * quiet_s:
        time.sleep(0.2)
        if late := own_haproxy(node_id):
            stop_processes(late)
            quiet_since = time.monotonic()


def own_haproxy(node_id: str) -> list:
    """The HAProxy processes this process's own Ray started: Ray's shutdown kills the
    proxy actor but not the HAProxy it runs, which would keep holding the port. Found as
    descendants, and by the config path Serve gives each node's HAProxy (it names the node):
    once the worker that started it has gone, HAProxy is orphaned, no longer a descendant."""
    import psutil

    descendants = {child.pid for child in psutil.Process().children(recursive=True)}
    found = []
    for process in psutil.process_iter(["name", "cmdline", "status"]):
        info = process.info
        if info["name"] != "haproxy" or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if process.pid in descendants or any(node_id in arg for arg in info["cmdline"] or ()):
            found.append(process)
    return found


def stop_processes(processes: list, grace_s: float = 5.0) -> None:
    """Terminate, then kill what is still running after `grace_s` (pipeline.reaper's
    pattern; `deploy` does not import `pipeline`)."""
    import psutil

    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            continue


__all__ = ["ArtifactError", "Limits", "build", "from_args", "serve_forever"]
