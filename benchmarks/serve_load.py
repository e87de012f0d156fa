"""Load on `vae-generate serve` over loopback, with and without request batching.

    .venv/bin/python benchmarks/serve_load.py --model runs/latest/artifact

For each mode (batching: up to 64 requests per decode call, waiting at most 2 ms;
none: --max-batch-size 1) it starts the server in its own process, warms it up, then
sends a fixed number of single-latent decode requests from 1, 8, 32 and 64 concurrent
clients (each a thread with its own keep-alive connection), and reports requests/s,
p50 and p99 latency, errors, the decode calls the replica made, and whether the replica
was restarted. Target: at 32 concurrent clients with batching, p99 < 100 ms, no error,
no restart. Clients and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

VENV_BIN = Path(sys.executable).parent
TARGET_P99_MS = 100.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive HTTP connection."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        self.connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = self.connection.getresponse()
        return response.status, response.read()


def start_server(
    model: Path, max_batch_size: int, replicas: int = 1, batch_wait_ms: float = 2.0
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    process = subprocess.Popen(
        [
            str(VENV_BIN / "vae-generate"),
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--max-batch-size",
            str(max_batch_size),
            "--replicas",
            str(replicas),
            "--batch-wait-ms",
            str(batch_wait_ms),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while True:
        try:
            if Client(port).request("GET", "/healthz")[0] == 200:
                return process, port
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("serve_load: the server did not start")
        time.sleep(0.5)


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def load(port: int, latent_dim: int, concurrency: int, requests: int) -> dict:
    """`requests` single-latent decodes from `concurrency` clients; latencies in ms."""
    rng = np.random.default_rng(concurrency)
    bodies = [{"latents": [row.tolist()]} for row in rng.standard_normal((requests, latent_dim)).astype(np.float32)]
    clients = [Client(port) for _ in range(concurrency)]
    per_client = [bodies[i::concurrency] for i in range(concurrency)]

    def run(index: int) -> tuple[list[float], int]:
        latencies, errors = [], 0
        for body in per_client[index]:
            started = time.perf_counter()
            try:
                status, _ = clients[index].request("POST", "/v1/decode", body)
            except OSError:
                status = 0
                clients[index] = Client(port)
            latencies.append((time.perf_counter() - started) * 1000)
            errors += status != 200
        return latencies, errors

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(run, range(concurrency)))
    wall = time.perf_counter() - started
    latencies = np.concatenate([np.asarray(r[0]) for r in results])
    return {
        "concurrency": concurrency,
        "requests": requests,
        "requests_per_s": requests / wall,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "errors": sum(r[1] for r in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="artifact directory")
    parser.add_argument("--requests", type=int, default=640, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument(
        "--replicas", type=int, default=1, help="(the restart check reads one replica's pid: use 1 for it)"
    )
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    rows, met = [], True
    for mode, max_batch_size in (("batching", 64), ("none", 1)):
        process, port = start_server(args.model, max_batch_size, args.replicas, args.batch_wait_ms)
        try:
            probe = Client(port)
            latent_dim = json.loads(probe.request("GET", "/v1/model")[1])["latent_dim"]
            pid = json.loads(probe.request("GET", "/v1/stats")[1])["replica_pid"]
            load(port, latent_dim, 8, 200)  # warm-up
            for concurrency in levels:
                before = json.loads(probe.request("GET", "/v1/stats")[1])
                row = {"mode": mode, **load(port, latent_dim, concurrency, args.requests)}
                after = json.loads(probe.request("GET", "/v1/stats")[1])
                calls = sum(after["decode_calls_by_requests"].values()) - sum(
                    before["decode_calls_by_requests"].values()
                )
                row["decode_calls"] = calls
                row["replica_restarted"] = after["replica_pid"] != pid
                rows.append(row)
                print(
                    f"{mode:9s} {concurrency:3d} clients: {row['requests_per_s']:7.1f} req/s  "
                    f"p50 {row['p50_ms']:6.1f} ms  "
                    f"p99 {row['p99_ms']:6.1f} ms  errors {row['errors']}  decode calls {calls}  "
                    f"restarted {row['replica_restarted']}",
                    flush=True,
                )
        finally:
            stop_server(process)
    for row in rows:
        if row["mode"] == "batching" and row["concurrency"] == 32:
            ok = row["p99_ms"] < TARGET_P99_MS and row["errors"] == 0 and not row["replica_restarted"]
            met = met and ok
            print(
                f"target (batching, 32 clients): p99 {row['p99_ms']:.1f} ms < {TARGET_P99_MS:.0f} ms, "
                f"{row['errors']} errors, restarted {row['replica_restarted']}: {'met' if ok else 'NOT met'}"
            )
    for concurrency in levels:
        pair = {row["mode"]: row for row in rows if row["concurrency"] == concurrency}
        print(
            f"{concurrency:3d} clients: batching / none throughput "
            f"{pair['batching']['requests_per_s'] / pair['none']['requests_per_s']:.2f}x"
        )
    print(json.dumps(rows))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
