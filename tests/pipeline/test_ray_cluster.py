"""Joining a cluster: an address where something other than Ray listens fails in bounded time."""

import http.server
import socket
import threading
import time

import pytest

from pipeline.cli import main
from pipeline.cluster.connection import check_dashboard, check_speaks_ray
from pipeline.errors import PipelineError
from tests.helpers import single_error_line

BOUND_S = 15


@pytest.fixture
def http_server():
    """A plain HTTP/1.1 server on loopback: it answers, but not as Ray."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()  # a late client is refused rather than left waiting


@pytest.fixture
def silent_listener():
    """A socket that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for connection in accepted:
        connection.close()


def test_a_real_ray_cluster_answers_the_probe(ray_local):
    address = ray_local._private.worker.global_worker.node.gcs_address
    started = time.monotonic()
    check_speaks_ray(address)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("server", ["http_server", "silent_listener"])
@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_that_is_not_ray_fails_within_the_bound(request, server, scheme):
    address = scheme + request.getfixturevalue(server)
    started = time.monotonic()
    with pytest.raises(PipelineError, match=f"{address} does not answer as a Ray cluster"):
        check_speaks_ray(address, timeout=2)  # the CLI's own deadline is tested below
    assert time.monotonic() - started < BOUND_S


@pytest.mark.parametrize("server", ["http_server", "silent_listener"])
def test_train_against_a_non_ray_port_is_one_line_and_writes_nothing(request, tmp_path, capsys, small_dataset, server):
    out = tmp_path / "run"
    address = request.getfixturevalue(server)
    started = time.monotonic()
    assert main(["train", "--data", str(small_dataset), "--out", str(out), "--address", address]) == 2
    assert time.monotonic() - started < BOUND_S
    assert "does not answer as a Ray cluster" in single_error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("server", ["http_server", "silent_listener"])
def test_submit_to_a_port_that_is_not_a_ray_dashboard_fails_within_the_bound(request, capsys, server):
    address = "http://" + request.getfixturevalue(server)
    started = time.monotonic()
    assert main(["submit", "--address", address, "--no-wait"]) == 2
    assert time.monotonic() - started < BOUND_S
    assert f"{address} does not answer as a Ray dashboard" in single_error_line(capsys.readouterr().err)


def test_check_dashboard_names_the_status(http_server):
    with pytest.raises(PipelineError, match=r"HTTP 404 for /api/version"):
        check_dashboard(f"http://{http_server}")
