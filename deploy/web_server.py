"""`vae-generate web`: the browser page (deploy/web/) and one artifact, served on a local
address with the standard library.

The page runs the model itself with onnxruntime-web; this server only hands out files:
the page's own (an allow-list), the onnxruntime-web files the build step copied into
`deploy/web/ort/`, and the artifact's files listed in its SHA256SUMS under `/model/`.
With threads on (the default) every response carries the cross-origin isolation headers
(COOP/COEP) that multi-threaded WebAssembly needs; `threads=False` leaves them out and
the page runs single-threaded.
"""

from __future__ import annotations

import http.server
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

from deploy.artifact import CHECKSUMS_FILE, verify_checksums

WEB_DIR = Path(__file__).resolve().parent / "web"
PAGE_FILES = ("index.html", "app.mjs", "model.mjs", "style.css")
RUNTIME_DIR = "ort"
RUNTIME_ENTRY = "ort.wasm.min.mjs"
BUILD_HINT = "npm ci --prefix deploy/web && npm run build --prefix deploy/web (scripts/setup.sh runs it)"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".onnx": "application/octet-stream",
    ".md": "text/markdown; charset=utf-8",
    "": "text/plain; charset=utf-8",
}


def check_built(web_dir: Path = WEB_DIR) -> None:
    if not (web_dir / RUNTIME_DIR / RUNTIME_ENTRY).is_file():
        raise FileNotFoundError(f"{web_dir / RUNTIME_DIR}: onnxruntime-web is not built; run {BUILD_HINT}")


def routes(artifact_dir: Path, web_dir: Path = WEB_DIR) -> dict[str, Path]:
    """Every URL path the server answers, with the file behind it."""
    table = {f"/{name}": web_dir / name for name in PAGE_FILES}
    table["/"] = web_dir / "index.html"
    for path in sorted((web_dir / RUNTIME_DIR).iterdir()):
        table[f"/{RUNTIME_DIR}/{path.name}"] = path
    for name in [*verify_checksums(artifact_dir), CHECKSUMS_FILE]:
        table[f"/model/{name}"] = artifact_dir / name
    return table


class PageServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], table: dict[str, Path], threads: bool):
        self.table, self.threads = table, threads
        super().__init__(address, PageHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class PageHandler(http.server.BaseHTTPRequestHandler):
    server: PageServer

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        self.answer(with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self.answer(with_body=False)

    def answer(self, with_body: bool) -> None:
        path = self.server.table.get(unquote(urlsplit(self.path).path))
        if path is None or not path.is_file():
            self.send_error(404, "not one of this page's files")
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", TYPES.get(path.suffix, TYPES[""]))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        if self.server.threads:
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the standard library's name)
        pass


def make_server(
    artifact_dir: str | Path, host: str = "127.0.0.1", port: int = 8080, threads: bool = True
) -> PageServer:
    """A server ready to `serve_forever()`; ArtifactError for an artifact that does not
    match its SHA256SUMS, FileNotFoundError when the page's runtime is not built."""
    check_built()
    return PageServer((host, port), routes(Path(artifact_dir).resolve()), threads)


def start_in_thread(server: PageServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="vae-web", daemon=True)
    thread.start()
    return thread
