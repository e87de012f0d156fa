"""When the CLI started the local Ray, no Ray process outlives it, however it ends."""

import os
import signal
import subprocess
import sys
import time

import psutil

from pipeline.cluster.reaper import POLL_S

GONE_WITHIN_S = 20


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_no_ray_process_outlives_a_cli_killed_with_sigkill(tmp_path, small_dataset):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "pipeline.cli", "train", "--data", str(small_dataset), "--out", str(out)]
    command += ["--epochs", "200", "--set", "model.preset=seed", "--set", "model.latent_dim=4"]
    command += ["--set", "train.batch_size=64"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    cli = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        # Kill once the whole local Ray is up, agents included (they are what outlived
        # the CLI before): no need to wait for training itself.
        def ray_is_up():
            assert cli.poll() is None, "the CLI ended before its Ray was up"
            try:
                commands = " ".join(" ".join(p.cmdline()) for p in psutil.Process(cli.pid).children(recursive=True))
            except psutil.Error:
                return False
            return all(name in commands for name in ("raylet", "gcs_server", "DashboardAgent", "RuntimeEnvAgent"))

        wait_for(ray_is_up, 300, "the CLI never started a local Ray with its agents")
        time.sleep(2 * POLL_S)  # the watchdog notes descendants once per POLL_S
        descendants = psutil.Process(cli.pid).children(recursive=True)
        os.kill(cli.pid, signal.SIGKILL)  # nothing in the CLI runs: only the watchdog can clean up
        cli.wait(timeout=60)
        _, alive = psutil.wait_procs(descendants, timeout=GONE_WITHIN_S)
        assert alive == [], [(p.pid, p.name()) for p in alive]
    finally:
        if cli.poll() is None:
            cli.kill()
