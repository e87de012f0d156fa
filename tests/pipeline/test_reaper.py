"""When the CLI started the local Ray, no Ray process outlives it, however it ends."""

import os
import signal
import subprocess
import sys
import time

import psutil

from pipeline.schema import METRICS_FILE

GONE_WITHIN_S = 20


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_no_ray_process_outlives_a_cli_killed_with_sigkill(tmp_path, small_dataset):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "pipeline.cli", "train", "--data", str(small_dataset), "--out", str(out),
               "--epochs", "200", "--set", "model.preset=seed", "--set", "model.latent_dim=4",
               "--set", "train.batch_size=64"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    cli = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        metrics = out / METRICS_FILE
        wait_for(lambda: metrics.is_file() and metrics.read_text().strip(), 300, "training never started")
        descendants = psutil.Process(cli.pid).children(recursive=True)
        names = " ".join(p.name() for p in descendants)
        assert "raylet" in names and "gcs_server" in names, names  # a local Ray, started by the CLI
        os.kill(cli.pid, signal.SIGKILL)  # nothing in the CLI runs: only the watchdog can clean up
        cli.wait(timeout=60)
        _, alive = psutil.wait_procs(descendants, timeout=GONE_WITHIN_S)
        assert alive == [], [(p.pid, p.name()) for p in alive]
    finally:
        if cli.poll() is None:
            cli.kill()
