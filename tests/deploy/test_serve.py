"""`vae-generate serve`: a real Ray Serve application over HTTP on 127.0.0.1."""

import contextlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from deploy import Generator
from tests.helpers import free_port

VENV_BIN = os.path.dirname(sys.executable)
MAX_BODY = 64 * 1024
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def runs(artifact, tmp_path_factory):
    """A runs directory as the pipeline leaves it: two runs holding the artifact, and
    `champion`, a relative symbolic link, naming the first."""
    runs = tmp_path_factory.mktemp("runs")
    for name in ("run-a", "run-b"):
        shutil.copytree(artifact.out, runs / name / "artifact")
        (runs / name / "run.json").write_text(json.dumps({"format": "vae-pipeline/run/v1", "status": "complete"}))
    os.symlink("run-a", runs / "champion")
    return runs


def point(runs, name):
    """Move `champion` as the pipeline does: a new link renamed over the old one."""
    tmp = runs / ".champion.tmp"
    os.symlink(name, tmp)
    os.replace(tmp, runs / "champion")


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """The CLI in its own process, with its own local Ray, as a user starts it, serving
    RUNS/champion and checking every half second whether it moved."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "output.txt"  # a file: Ray's processes may hold a pipe open
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                os.path.join(VENV_BIN, "vae-generate"),
                "serve",
                "--model",
                str(runs / "champion"),
                "--watch-s",
                "0.5",
                "--port",
                str(port),
                "--max-body-bytes",
                str(MAX_BODY),
                "--batch-wait-ms",
                "20",
                "--body-timeout-s",
                str(BODY_TIMEOUT_S),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if call(url, "GET", "/healthz")[0] == 200:
                break
        except OSError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    yield url
    # SIGTERM, as kill, docker stop and systemd send it: Serve and Ray shut down. (Not
    # SIGINT: pytest run from a script's background job inherits SIGINT ignored, and the
    # server would never see it.)
    process.send_signal(signal.SIGTERM)
    time.sleep(1)  # and again, as an impatient supervisor might: the cleanup must still finish
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # The HAProxy it started must not outlive it (it once did, holding the port). Ray's
    # own processes may take a while to go under load: they are stopped here, not judged.
    deadline = time.monotonic() + 30
    while (left := session_processes(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    names = [name_of(leftover) for leftover in left]
    for leftover in left:
        with contextlib.suppress(Exception):
            leftover.kill()
    assert process.returncode == 0, f"exit {process.returncode} after SIGTERM: {log.read_text()[-3000:]}"
    assert "haproxy" not in names, names


def name_of(process) -> str:
    try:
        return process.name()
    except Exception:  # gone or a zombie by now
        return "?"


def session_processes(session_id: int) -> list:
    """Live processes of the session the server was started in (start_new_session)."""
    import psutil

    found = []
    for candidate in psutil.process_iter():
        try:
            if os.getsid(candidate.pid) == session_id and candidate.status() != psutil.STATUS_ZOMBIE:
                found.append(candidate)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


@pytest.fixture(scope="module")
def generator(artifact):
    return Generator(artifact.out, providers="cpu")


def call(url, method, path, body=None, content_type="application/json"):
    """(status, content type, body bytes); never raises for an HTTP error status."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    request = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get_content_type(), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get_content_type(), exc.read()


def ok_json(result):
    status, kind, body = result
    assert status == 200 and kind == "application/json", (status, body[:300])
    return json.loads(body)


def png_of(pixels):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def declared_png(width, height):
    """A 69-byte PNG that declares `width` x `height` 8-bit grey pixels (a decompression
    bomb: Pillow reads the size on open, before any pixel)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b"")


def test_every_route(server, generator):
    assert ok_json(call(server, "GET", "/healthz")) == {"status": "ok"}
    card = ok_json(call(server, "GET", "/v1/model"))
    assert card["latent_dim"] == generator.latent_dim == 4 and card["providers"][0] == "CPUExecutionProvider"

    z = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    images = np.asarray(ok_json(call(server, "POST", "/v1/decode", {"latents": z.tolist()}))["images"])
    np.testing.assert_allclose(images, generator.decode(z)[..., 0], atol=1e-6)
    status, kind, png = call(server, "POST", "/v1/decode", {"latents": z.tolist(), "format": "png"})
    assert (status, kind) == (200, "image/png") and png[:8] == b"\x89PNG\r\n\x1a\n"

    sampled = ok_json(call(server, "POST", "/v1/sample", {"n": 5, "seed": 3, "temperature": 0.8, "format": "json"}))
    np.testing.assert_allclose(sampled["images"], generator.sample(5, seed=3, temperature=0.8)[..., 0], atol=1e-6)
    status, kind, png = call(server, "POST", "/v1/sample", {"n": 4, "seed": 1})
    assert (status, kind) == (200, "image/png") and png[:8] == b"\x89PNG\r\n\x1a\n"

    pixels = (generator.sample(1, seed=5)[0, ..., 0] * 255).round().astype(np.uint8)
    encoded = ok_json(call(server, "POST", "/v1/encode", png_of(pixels), content_type="image/png"))
    z_mean, z_log_var = generator.encode(pixels[None].astype(np.float32) / 255)
    np.testing.assert_allclose(encoded["z_mean"], z_mean, atol=1e-5)
    np.testing.assert_allclose(encoded["z_log_var"], z_log_var, atol=1e-5)
    from_json = ok_json(call(server, "POST", "/v1/encode", {"images": (pixels / 255).tolist()}))
    np.testing.assert_allclose(from_json["z_mean"], z_mean, atol=1e-5)


BAD = [
    (
        "wrong shape",
        "POST",
        "/v1/decode",
        {"latents": [[[0.0] * 4]]},
        "application/json",
        400,
        "must have shape (N, 4)",
    ),
    ("wrong latent size", "POST", "/v1/decode", {"latents": [[0.0] * 5]}, "application/json", 400, "got (1, 5)"),
    (
        "NaN",
        "POST",
        "/v1/decode",
        b'{"latents": [[NaN, 0, 0, 0]]}',
        "application/json",
        400,
        "NaN is not a finite number",
    ),
    (
        "huge number",
        "POST",
        "/v1/decode",
        b'{"latents": [[1e999, 0, 0, 0]]}',
        "application/json",
        400,
        "holds NaN or Inf",
    ),
    (
        "not numbers",
        "POST",
        "/v1/decode",
        {"latents": [["a", 0, 0, 0]]},
        "application/json",
        400,
        "nested list of numbers",
    ),
    ("no latents", "POST", "/v1/decode", {"z": []}, "application/json", 400, "missing 'latents'"),
    ("too many rows", "POST", "/v1/decode", {"latents": [[0.0] * 4] * 257}, "application/json", 400, "1 to 256 rows"),
    ("not JSON", "POST", "/v1/decode", b"latents=1", "application/json", 400, "the body is not JSON"),
    ("a list body", "POST", "/v1/sample", [1, 2], "application/json", 400, "must be a JSON object"),
    ("n too large", "POST", "/v1/sample", {"n": 100000}, "application/json", 400, "'n' must be an integer in [1, 256]"),
    ("n not an integer", "POST", "/v1/sample", {"n": 2.5}, "application/json", 400, "'n' must be an integer"),
    (
        "bad temperature",
        "POST",
        "/v1/sample",
        {"temperature": -1},
        "application/json",
        400,
        "temperature must be in (0, 10]",
    ),
    ("bad format", "POST", "/v1/sample", {"format": "gif"}, "application/json", 400, "format must be 'json' or 'png'"),
    ("not an image", "POST", "/v1/encode", b"this is not a PNG", "image/png", 415, "not a readable PNG"),
    ("wrong image size", "POST", "/v1/encode", "png 10x10", "image/png", 400, "must be 28x28 pixels, got 10x10"),
    ("decompression bomb", "POST", "/v1/encode", "png of 20000x20000", "image/png", 413, "far larger than 28x28"),
    (
        "pixels out of range",
        "POST",
        "/v1/encode",
        {"images": [[[2.0] * 28] * 28]},
        "application/json",
        400,
        "in [0, 1]",
    ),
    ("unknown route", "POST", "/v1/nothing", {}, "application/json", 404, "no route POST /v1/nothing"),
    ("wrong method", "GET", "/v1/decode", None, "application/json", 405, "no route GET /v1/decode"),
    ("body too large", "POST", "/v1/decode", b" " * (MAX_BODY + 1), "application/json", 413, "over the limit of 65536"),
]


@pytest.mark.parametrize("case", BAD, ids=[case[0] for case in BAD])
def test_bad_input_is_a_4xx_with_a_json_error_and_the_replica_lives(server, case):
    _, method, path, body, content_type, status, message = case
    if body == "png 10x10":
        body = png_of(np.zeros((10, 10), np.uint8))
    if body == "png of 20000x20000":
        body = declared_png(20000, 20000)
    pid = ok_json(call(server, "GET", "/v1/stats"))["replica_pid"]
    got_status, kind, raw = call(server, method, path, body, content_type)
    assert (got_status, kind) == (status, "application/json"), raw[:300]
    assert message in json.loads(raw)["error"]
    assert ok_json(call(server, "GET", "/healthz")) == {"status": "ok"}
    assert ok_json(call(server, "GET", "/v1/stats"))["replica_pid"] == pid


def test_a_client_that_stalls_mid_body_gets_a_json_408_and_the_replica_lives(server):
    """Half a body, then nothing: the server answers (JSON, 408) once the body timeout has
    passed, not Serve's plain-text 408 thirty seconds in."""
    import http.client
    import socket

    pid = ok_json(call(server, "GET", "/v1/stats"))["replica_pid"]
    host, port = server.removeprefix("http://").split(":")
    body = b'{"latents": [[0.0, 0.0'
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(
            b"POST /v1/decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body) * 4}\r\n\r\n".encode()
            + body
        )
        started = time.monotonic()
        response = http.client.HTTPResponse(connection)
        response.begin()
        waited = time.monotonic() - started
        status, kind, raw = response.status, response.headers.get_content_type(), response.read()
    assert (status, kind) == (408, "application/json"), raw[:300]
    assert json.loads(raw)["error"] == f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"
    assert BODY_TIMEOUT_S - 0.5 < waited < BODY_TIMEOUT_S + 10, waited
    assert ok_json(call(server, "GET", "/v1/stats"))["replica_pid"] == pid


def test_concurrent_requests_are_decoded_together(server, generator):
    before = ok_json(call(server, "GET", "/v1/stats"))["decode_calls_by_requests"]
    latents = np.random.default_rng(1).standard_normal((32, 4)).astype(np.float32)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda z: call(server, "POST", "/v1/decode", {"latents": [z.tolist()]}), latents))
    images = np.stack([np.asarray(ok_json(result)["images"][0]) for result in results])
    np.testing.assert_allclose(images, generator.decode(latents)[..., 0], atol=1e-6)  # each got its own image
    after = ok_json(call(server, "GET", "/v1/stats"))["decode_calls_by_requests"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert sum(size * count for size, count in new.items()) == 32
    assert max(new) > 1, new  # at least one onnxruntime call carried several requests


def test_the_server_follows_the_champion_without_a_failed_request(server, runs, artifact):
    """Clients decode without pause while `champion` moves to another run: no request
    fails, the new run is served within seconds, and the latency across the swap is
    reported. A champion whose artifact fails its checksums is refused, and the model
    serving goes on serving."""
    assert ok_json(call(server, "GET", "/v1/model"))["served"]["run"] == "run-a"
    stop, latencies, failures = threading.Event(), [], []

    def client():
        z = np.zeros((1, artifact.card["latent_dim"]), np.float32).tolist()
        while not stop.is_set():
            started = time.monotonic()
            try:
                status, _, _ = call(server, "POST", "/v1/decode", {"latents": z})
            except OSError as exc:
                status = repr(exc)
            latencies.append(time.monotonic() - started)
            if status != 200:
                failures.append(status)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    point(runs, "run-b")
    moved = time.monotonic()
    while ok_json(call(server, "GET", "/v1/model"))["served"]["run"] != "run-b":
        assert time.monotonic() - moved < 60, "the new champion was not served within 60 s"
        time.sleep(0.1)
    swap_s = time.monotonic() - moved
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join()
    p99 = float(np.percentile(latencies, 99)) * 1000
    print(f"swap: served in {swap_s:.1f} s; {len(latencies)} requests, p99 {p99:.0f} ms, {len(failures)} failed")
    assert failures == [] and len(latencies) > 50

    # A champion whose decoder does not match SHA256SUMS: refused; run-b goes on serving.
    shutil.copytree(runs / "run-b", runs / "run-c")
    decoder = runs / "run-c" / "artifact" / "decoder.onnx"
    decoder.write_bytes(decoder.read_bytes()[:-10])
    point(runs, "run-c")
    time.sleep(3)
    assert ok_json(call(server, "GET", "/v1/model"))["served"]["run"] == "run-b"
    assert call(server, "POST", "/v1/decode", {"latents": [[0.0] * artifact.card["latent_dim"]]})[0] == 200


def fake_haproxy(tmp_path):
    """`sleep` under HAProxy's name: give it "<node_id>s" and the node id is in its arguments."""
    import shutil

    fake = tmp_path / "haproxy"
    shutil.copy(shutil.which("sleep"), fake)
    return fake


def copies_of(fake, processes) -> list:
    """The live ones of `processes` running `fake`: this test's, not the server fixture's real HAProxy."""
    import psutil

    mine = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.exe() == str(fake) and process.status() != psutil.STATUS_ZOMBIE:
                mine.append(process)
    return mine


def test_an_orphaned_haproxy_of_this_node_is_found_and_stopped(tmp_path):
    """The Ray worker that started HAProxy can go first and leave it orphaned;
    `serve_forever` still finds it by the node id in its config path."""
    import psutil

    from deploy.serve_process import own_haproxy, stop_processes

    fake = fake_haproxy(tmp_path)
    node_id = str(10**9 + os.getpid())  # digits, so that `sleep` takes it: "<node_id>s"
    subprocess.run(["sh", "-c", f"'{fake}' 300 {node_id}s >/dev/null 2>&1 &"], check=True)  # orphaned at once
    deadline = time.monotonic() + 10
    while not (found := copies_of(fake, own_haproxy(node_id))) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert len(found) == 1
        assert found[0].pid not in {p.pid for p in psutil.Process().children(recursive=True)}
        assert copies_of(fake, own_haproxy(str(10**9 - 1))) == []  # another node's HAProxy is not ours
        stop_processes(found, grace_s=5)
        assert not found[0].is_running()
    finally:
        for process in found:
            with contextlib.suppress(psutil.Error):
                process.kill()


def test_a_haproxy_that_comes_after_rays_shutdown_is_stopped_too(tmp_path):
    """A proxy actor can outlive ray.shutdown() by a moment and start one more HAProxy."""
    import threading

    import psutil

    from deploy.serve_process import stop_own_haproxy

    fake = fake_haproxy(tmp_path)
    node_id = str(10**9 + 7 + os.getpid())
    late = threading.Timer(1.0, lambda: subprocess.Popen([str(fake), "300", f"{node_id}s"], start_new_session=True))
    started = time.monotonic()
    late.start()
    try:
        stop_own_haproxy(node_id, [], quiet_s=2.0)
    finally:
        late.join()
    assert time.monotonic() - started >= 3.0  # it waited out the quiet time after the late one
    running = copies_of(fake, psutil.process_iter())
    for process in running:
        process.kill()
    assert running == []
