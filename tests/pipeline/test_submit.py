import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.submit import flatten_overrides
from tests.helpers import REAL_DATA_DIR, has_real_data, write_idx_dir

VENV_BIN = Path(sys.executable).parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp_dir, gcs_port):
    """Kill only the processes of the Ray started with `temp_dir` (`ray stop` kills every
    Ray): those naming its temp dir or its GCS port (the Ray client server), with every
    descendant (the agents rename themselves `ray::...` and would outlive the raylet)."""
    import psutil

    victims = {}
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if str(temp_dir) in command or f":{gcs_port} " in f"{command} ":
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


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head on 127.0.0.1 with the Jobs API."""
    port, dashboard = free_port(), free_port()
    temp = tmp_path_factory.mktemp("rayhead")
    # Loopback-only test cluster: token auth off (a real cluster keeps it, see README).
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"  # the cluster's `python` has the deps
    subprocess.run(
        [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=3", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--temp-dir={temp}", "--disable-usage-stats",
         # Its own agent ports, so another Ray on this machine cannot hold them.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
        check=True, capture_output=True, env=env, timeout=180,
    )
    yield f"http://127.0.0.1:{dashboard}"
    stop_cluster(temp, port)


def test_flattened_config_reads_back_identically():
    config = load_config(overrides=["model.filters=[8, 16]", "data.limit=5", "ray.address=ray://h:1"])
    assert load_config(overrides=flatten_overrides(config)) == config


def test_submit_runs_the_pipeline_as_a_job(tmp_path, ray_head, capsys):
    source = REAL_DATA_DIR if has_real_data() else write_idx_dir(tmp_path / "idx", 512, 512)
    config = tmp_path / "small.toml"
    config.write_text(
        f'[data]\nsource = "idx:{source}"\nlimit = 256\nrows_per_file = 128\n'
        '[model]\npreset = "seed"\nlatent_dim = 2\n[train]\nepochs = 1\nbatch_size = 64\n'
        "[evaluate]\niwae_k = 2\n"
    )
    run_dir = tmp_path / "jobrun"
    code = main(["submit", "--address", ray_head, "--config", str(config), "--run-dir", str(run_dir)])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out[-3000:] + captured.err[-1500:]
    assert out.strip().splitlines()[-1].endswith(": SUCCEEDED")
    assert f"artifact: {run_dir / 'artifact'}" in out
    assert (run_dir / "artifact" / "decoder.onnx").is_file()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_no_wait_then_status_and_logs(tmp_path, ray_head, capsys):
    code = main(["submit", "--address", ray_head, "--no-wait", "--run-dir", str(tmp_path / "r"),
                 "--set", "data.source=idx:/nonexistent"])
    job_id = capsys.readouterr().out.strip()
    assert code == 0 and job_id
    deadline = time.monotonic() + 120
    while main(["status", job_id, "--address", ray_head]) == 0:
        capsys.readouterr()
        assert time.monotonic() < deadline
        time.sleep(1)
    assert capsys.readouterr().out.strip() == "FAILED"
    assert main(["logs", job_id, "--address", ray_head]) == 0
    assert "source directory not found" in capsys.readouterr().out


def test_unreachable_address_fails_fast(capsys):
    started = time.monotonic()
    assert main(["submit", "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vae-pipeline: error: cannot reach Ray cluster at http://127.0.0.1:9: Connection refused"]
    assert time.monotonic() - started < 10
