import os
import re
import subprocess
import sys
import time
from pathlib import Path

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.runs.submit import flatten_overrides, stage_packages
from pipeline.storage import Store
from tests.helpers import REAL_DATA_DIR, has_real_data, single_error_line, write_idx_dir

VENV_BIN = Path(sys.executable).parent


def test_flattened_config_reads_back_identically():
    config = load_config(
        overrides=["model.filters=[8, 16]", "model.context=none", "data.limit=5", "ray.address=ray://h:1"]
    )
    assert config.model.context == "none"  # the word: the job on the cluster must not get the preset's `rows`
    assert load_config(overrides=flatten_overrides(config)) == config


def test_submit_to_several_nodes_with_runs_in_s3_then_fetch_and_generate(
    tmp_path, ray_nodes, s3_bucket, capsys, monkeypatch
):
    """The job's driver runs on the head (no CPUs), training and evaluation on the two
    worker nodes; every output goes to the S3 server, and comes back with `fetch`."""
    source = REAL_DATA_DIR if has_real_data() else write_idx_dir(tmp_path / "idx", 512, 512)
    config = tmp_path / "small.toml"
    config.write_text(
        f'[data]\nsource = "idx:{source}"\nlimit = 256\nrows_per_file = 128\n'
        '[model]\npreset = "seed"\nlatent_dim = 2\n'
        "[train]\nepochs = 1\nbatch_size = 64\nnum_workers = 2\ncpus_per_worker = 1\n"
        "[evaluate]\niwae_k = 2\n"
    )
    runs = f"{s3_bucket}/runs"
    monkeypatch.setenv("VAE_PIPELINE_RUNS", runs)  # `submit` takes a configured URI as its default
    code = main(["submit", "--address", ray_nodes.dashboard, "--config", str(config)])
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert code == 0, out[-3000:] + err[-1500:]
    assert out.strip().splitlines()[-1].endswith(": SUCCEEDED")
    run = re.search(rf"submit: the run will land in ({re.escape(runs)}/run-[0-9-]+[0-9a-f]{{4}})\n", err).group(1)
    assert f"artifact: {run}/artifact" in out
    store = Store.open(run)
    record = store.read_json("run.json")
    assert record["status"] == "complete"
    assert record["stages"]["train"]["config"]["train"]["storage_path"] == f"{run}/train/ray"
    assert any("/checkpoint_epoch_" in name for name in store.list_files("train/ray"))

    # fetch (through RUNS/latest), then use the artifact
    assert main(["fetch", f"{runs}/latest", "--out", str(tmp_path / "model")]) == 0
    assert capsys.readouterr().out.startswith(f"artifact fetched: {tmp_path / 'model'} (")
    generated = subprocess.run(
        [
            str(VENV_BIN / "vae-generate"),
            "--model",
            str(tmp_path / "model"),
            "--n",
            "4",
            "--seed",
            "1",
            "--out",
            str(tmp_path / "samples.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stderr
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A file changed in the store after the run is refused, and nothing is written.
    decoder = store.read_bytes("artifact/decoder.onnx")
    store.write_text("artifact/decoder.onnx", "not the model")
    assert main(["fetch", run, "--out", str(tmp_path / "tampered")]) == 2
    assert single_error_line(capsys.readouterr().err) == (
        f"vae-pipeline: error: {run}/artifact/decoder.onnx: SHA-256 does not match SHA256SUMS (modified or corrupt)"
    )
    assert not (tmp_path / "tampered").exists()
    assert decoder is not None


def test_no_wait_then_status_and_logs(tmp_path, ray_nodes, capsys):
    code = main(
        [
            "submit",
            "--address",
            ray_nodes.dashboard,
            "--no-wait",
            "--run-dir",
            str(tmp_path / "r"),
            "--set",
            "data.source=idx:/nonexistent",
        ]
    )
    job_id = capsys.readouterr().out.strip()
    assert code == 0 and job_id
    deadline = time.monotonic() + 120
    while main(["status", job_id, "--address", ray_nodes.dashboard]) == 0:
        capsys.readouterr()
        assert time.monotonic() < deadline
        time.sleep(1)
    assert capsys.readouterr().out.strip() == "FAILED"
    assert main(["logs", job_id, "--address", ray_nodes.dashboard]) == 0
    assert "source directory not found" in capsys.readouterr().out


def test_an_installed_copy_submits_its_packages_not_the_directory_they_sit_in(tmp_path, ray_nodes):
    """In the pipeline image the packages are in site-packages, beside gigabytes of others.
    The job used to carry the directory above `pipeline/` (there: all of site-packages), so
    Ray refused the upload; it now carries the three packages, and the job runs that copy."""
    site = stage_packages(tmp_path / "site-packages")  # the three packages, as an install has them
    init = site / "pipeline" / "__init__.py"
    init.write_text(init.read_text() + '\nimport sys as _sys\n_sys.stderr.write(f"pipeline copy: {__file__}\\n")\n')
    (site / "bulky").mkdir()  # a neighbour over Ray's 100 MiB package limit, incompressible
    (site / "bulky" / "weights.bin").write_bytes(os.urandom(110 * 2**20))
    env = {**os.environ, "PYTHONPATH": str(site)}

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args, "--address", ray_nodes.dashboard],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    submitted = cli("submit", "--no-wait", "--run-dir", str(tmp_path / "r"), "--set", "data.source=idx:/nonexistent")
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    assert f"pipeline copy: {init}" in submitted.stderr  # the client itself ran the copy
    job_id = submitted.stdout.strip()
    deadline = time.monotonic() + 120
    while (status := cli("status", job_id)).stdout.strip() not in ("FAILED", "SUCCEEDED", "STOPPED"):
        assert status.returncode == 0 and time.monotonic() < deadline, status.stderr[-2000:]
        time.sleep(1)
    assert status.stdout.strip() == "FAILED"  # the source does not exist: the run's own one-line error
    logs = cli("logs", job_id).stdout
    # The job's driver imported the uploaded copy (Ray unpacks a working_dir in its session dir).
    assert re.search(r"pipeline copy: \S*working_dir_files\S*/pipeline/__init__\.py", logs), logs[-2000:]
    assert "/nonexistent" in logs and "error" in logs


def test_unreachable_address_fails_fast(capsys):
    started = time.monotonic()
    assert main(["submit", "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vae-pipeline: error: cannot reach Ray cluster at http://127.0.0.1:9: Connection refused"]
    assert time.monotonic() - started < 10
