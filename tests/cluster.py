"""A Ray cluster of several nodes on this one machine, started with `ray start` as on
separate machines: a head with no CPUs (as KubeRay heads are usually run: it holds the
GCS, the dashboard and job drivers) and worker nodes that can be killed and added.

Every process gets this process's environment, the S3 server's address and credentials
included, as a cluster's pods get theirs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from tests.helpers import free_port

VENV_BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 300 * 1024 * 1024


class LocalCluster:
    def __init__(self, temp_dir: Path):
        self.temp_dir = Path(temp_dir)
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.workers: dict[str, int] = {}  # node name -> its raylet's node manager port
        # Loopback-only test cluster: token auth off (a real cluster keeps it, see README).
        self.env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
        self.env["PATH"] = f"{VENV_BIN}{os.pathsep}{self.env['PATH']}"  # the nodes' `python` has the deps

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, *args: str) -> None:
        # Each node its own agent ports, so another Ray on this machine cannot hold them.
        ports = [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]
        done = subprocess.run(
            [
                str(VENV_BIN / "ray"),
                "start",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
                f"--object-store-memory={OBJECT_STORE_BYTES}",
                *ports,
                *args,
            ],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=180,
        )
        if done.returncode != 0:  # say why: Ray's own words, and where its logs are
            raise RuntimeError(
                f"ray start {' '.join(args)} failed ({done.returncode}); logs under {self.temp_dir}:\n"
                f"{(done.stdout + done.stderr)[-3000:]}"
            )

    def start_head(self) -> None:
        self._ray_start(
            "--head",
            f"--port={self.gcs_port}",
            "--num-cpus=0",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.temp_dir}",
        )

    def add_worker(self, name: str, cpus: int) -> None:
        port = free_port()
        self._ray_start(f"--address={self.address}", f"--num-cpus={cpus}", f"--node-manager-port={port}")
        self.workers[name] = port

    def raylet(self, name: str) -> psutil.Process:
        flag = f"--node_manager_port={self.workers[name]}"
        for process in psutil.process_iter(["cmdline"]):
            command = process.info["cmdline"] or []
            if flag in command and any(part.endswith("raylet") for part in command[:1]):
                return process
        raise LookupError(f"no raylet for node {name}")

    def kill_worker(self, name: str) -> None:
        """SIGKILL the node's raylet, as when its machine or pod dies."""
        self.raylet(name).send_signal(signal.SIGKILL)
        del self.workers[name]

    def stop(self) -> None:
        """Kill only this cluster's processes (`ray stop` kills every Ray): those naming
        its temp dir or its GCS port, with every descendant (the agents rename themselves
        `ray::...` and would outlive the raylet)."""
        victims = {}
        for process in psutil.process_iter(["cmdline"]):
            command = " ".join(process.info["cmdline"] or [])
            if str(self.temp_dir) in command or f":{self.gcs_port} " in f"{command} ":
                try:
                    for found in [process, *process.children(recursive=True)]:
                        victims[found.pid] = found
                except psutil.Error:
                    continue
        for process in victims.values():
            try:
                process.kill()
            except psutil.Error:
                continue
        _, alive = psutil.wait_procs(list(victims.values()), timeout=30)
        assert alive == [], alive
