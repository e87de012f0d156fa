"""`vae-generate`: sample a PNG grid of images from an exported artifact;
`vae-generate serve`: the model over HTTP (see deploy.serve);
`vae-generate web`: the browser page that runs the model itself (see deploy.web_server).

Images are decoded in batches and the PNG is written band by band, so memory stays
flat however many images are asked for; the file appears under its name only once it
is complete. Every user error is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from deploy.artifact import ArtifactError
from deploy.generator import Generator
from deploy.png import SIGNATURE, write_grid


class OneLineParser(argparse.ArgumentParser):
    """Usage errors (a missing or misspelt option, a bad value) as the one line and exit
    code 2 of every other user error, with where to look instead of the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog.split()[0]}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


# A grid of this many images is 28,000 pixels a side: past what image viewers open.
MAX_IMAGES = 1_000_000


def image_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_IMAGES:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_IMAGES} (one PNG grid), got {text}")
    return value


def _interrupt(signum, frame) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def check_out(path: Path) -> None:
    """`--out` may be new or an existing PNG file; a directory or any other file is refused."""
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; --out names the PNG file to write")
    if path.exists():
        with open(path, "rb") as handle:
            if handle.read(len(SIGNATURE)) != SIGNATURE:
                raise ValueError(f"{path}: exists and is not a PNG file; refusing to replace it")


def write_atomically(path: Path, write) -> None:
    """Call `write(handle)` on a temporary file beside `path`, then rename it to `path`;
    on any failure the temporary file is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def serve_main(argv: list[str]) -> int:
    """`vae-generate serve`: the model over HTTP (deploy.serve; needs the `serve` extra)."""
    parser = OneLineParser(
        prog="vae-generate serve", description="Serve an exported VAE over HTTP with Ray Serve.", allow_abbrev=False
    )
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="artifact directory, run directory, or a pointer such as RUNS/champion (followed as it moves)",
    )
    parser.add_argument(
        "--watch-s",
        type=seconds,
        default=5.0,
        help="how often to check whether --model names another artifact (default 5; 0: never)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=positive_int, default=8000, help="port (default 8000)")
    parser.add_argument("--replicas", type=positive_int, default=1, help="Serve replicas (default 1)")
    parser.add_argument("--address", help="an existing Ray cluster to run on (default: a local Ray)")
    parser.add_argument(
        "--max-batch-size", type=positive_int, default=64, help="requests per decode call; 1 turns batching off"
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=2.0, help="how long a batch waits for more requests (default 2)"
    )
    parser.add_argument("--max-rows", type=positive_int, default=256, help="latents, images or samples per request")
    parser.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="request body limit")
    parser.add_argument(
        "--body-timeout-s",
        type=seconds,
        default=10.0,
        help="how long a request body may take to arrive, under 30 (default 10; then a 408)",
    )
    parser.add_argument(
        "--ingress",
        default="auto",
        choices=("auto", "haproxy", "python"),
        help="Ray Serve's HTTP ingress (auto: HAProxy when installed, else Serve's Python proxy)",
    )
    args = parser.parse_args(argv)
    try:
        from deploy.serve import Limits
        from deploy.serve_process import serve_forever
    except ImportError as exc:
        print(f"vae-generate: error: serving needs the serve extra (pip install '.[serve]'): {exc}", file=sys.stderr)
        return 2
    try:
        limits = Limits(
            args.max_body_bytes, args.max_rows, args.max_batch_size, args.batch_wait_ms / 1000, args.body_timeout_s
        )
    except ValueError as exc:
        parser.error(f"--body-timeout-s: {exc}")
    try:
        serve_forever(args.model, args.host, args.port, args.replicas, limits, args.address, args.ingress, args.watch_s)
    except (ArtifactError, ValueError, OSError) as exc:
        print(f"vae-generate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def web_main(argv: list[str]) -> int:
    """`vae-generate web`: the page in deploy/web/ with one artifact, on a local address."""
    parser = OneLineParser(
        prog="vae-generate web",
        description="Serve the browser page that runs the VAE with onnxruntime-web, with one artifact.",
        allow_abbrev=False,
    )
    parser.add_argument("--model", type=Path, required=True, help="artifact directory (export stage output)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port)")
    parser.add_argument(
        "--single-thread",
        action="store_true",
        help="no cross-origin isolation headers: WebAssembly runs on one thread",
    )
    args = parser.parse_args(argv)
    from deploy.web_server import make_server

    try:
        server = make_server(args.model, args.host, args.port, threads=not args.single_thread)
    except (ArtifactError, ValueError, OSError) as exc:
        print(f"vae-generate: error: {exc}", file=sys.stderr)
        return 2
    mode = "single-threaded" if args.single_thread else "multi-threaded"
    print(f"vae-generate web: {server.url} ({args.model}, {mode} WebAssembly); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    if argv[:1] == ["web"]:
        return web_main(argv[1:])
    parser = OneLineParser(prog="vae-generate", description="Sample images from an exported VAE.", allow_abbrev=False)
    parser.add_argument("--model", type=Path, required=True, help="artifact directory (export stage output)")
    parser.add_argument(
        "--n", type=image_count, default=64, help=f"number of images (default 64, at most {MAX_IMAGES})"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--temperature", type=float, default=1.0, help="prior scale (default 1.0)")
    parser.add_argument("--providers", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument(
        "--allow-tf32", action="store_true", help="CUDA: faster TF32 arithmetic, images less close to the CPU's"
    )
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    # SIGTERM (kill, timeout, a supervisor) ends it as Ctrl-C does: through the cleanup that
    # removes the half-written temporary file.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        check_out(args.out)
        with Generator(args.model, providers=args.providers, allow_tf32=args.allow_tf32) as generator:
            batches = generator.sample_batches(args.n, seed=args.seed, temperature=args.temperature)
            write_atomically(args.out, lambda handle: write_grid(handle, batches, args.n))
    except (ArtifactError, ValueError, OSError) as exc:
        print(f"vae-generate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vae-generate: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"wrote {args.out} ({args.n} images, providers {generator.providers[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
