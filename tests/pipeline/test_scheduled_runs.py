"""Scheduled runs hand apps only a finished, no-worse model: `latest` and `champion`, the
gate, `promote`, `runs`, and MLflow tracking with its registry. Real runs (small), a
real MLflow server on loopback, real pointers on disk and in moto's S3 server."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import GateRejected
from pipeline.runs import gate, promotion
from pipeline.runs.pointers import Pointers
from pipeline.runs.run import run_pipeline
from pipeline.runs.tracking import Tracker
from pipeline.schema import RUN_FILE
from pipeline.storage import Store
from tests.helpers import REAL_DATA_DIR, has_real_data, single_error_line, write_idx_dir
from tests.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    if has_real_data():
        return REAL_DATA_DIR
    return write_idx_dir(tmp_path_factory.mktemp("idx"), 2048, 1024)


def settings(source, *extra):
    return [
        f"data.source=idx:{source}",
        "data.limit=1024",
        "data.rows_per_file=256",
        "model.preset=seed",
        "train.batch_size=64",
        "evaluate.iwae_k=2",
        *extra,
    ]


def cli_run(runs, source, *extra):
    argv = ["run", "--runs-root", str(runs)]
    for item in settings(source, *extra):
        argv += ["--set", item]
    return main(argv)


def pointer(runs, name):
    return Path(os.readlink(runs / name)).name if (runs / name).is_symlink() else None


def record(run_dir):
    return json.loads((Path(run_dir) / RUN_FILE).read_text())


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, source, mlflow_server, ray_local):
    """RUNS with a 3-epoch run (the champion), then a 1-epoch run (worse) through the command
    line, both tracked: (RUNS, the first run's result, the second's exit code and stderr)."""
    runs = tmp_path_factory.mktemp("scheduled") / "runs"
    tracked = f"tracking.uri={mlflow_server.uri}"
    good = run_pipeline(load_config(overrides=settings(source, "train.epochs=3", tracked)), runs_root=runs)
    assert pointer(runs, "champion") == pointer(runs, "latest") == good.run_dir.name
    time.sleep(1.1)  # run names carry the second they start
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = cli_run(runs, source, "train.epochs=1", tracked)
    return runs, good, (code, stderr.getvalue())


def test_a_worse_run_completes_but_is_not_promoted(two_runs, capsys):
    runs, good, (code, err) = two_runs
    assert code == 3
    line = single_error_line(err)
    [worse] = [p for p in runs.glob("run-*") if p.name != good.run_dir.name]
    ours, theirs = record(worse)["gate"]["metrics"], record(good.run_dir)["gate"]["metrics"]
    assert line.startswith(f"vae-pipeline: error: gate: {worse} not promoted: test negative ELBO ")
    assert f"{ours['neg_elbo']:.3f} is worse than champion {good.run_dir.name}'s {theirs['neg_elbo']:.3f}" in line
    assert ours["neg_elbo"] > theirs["neg_elbo"] + 0.3
    # Complete, so `latest`; not promoted, so the champion stays; its artifact kept for inspection.
    assert record(worse)["status"] == "complete" and (worse / "artifact" / "decoder.onnx").is_file()
    assert pointer(runs, "latest") == worse.name and pointer(runs, "champion") == good.run_dir.name
    decision = record(worse)["gate"]
    assert decision["passed"] is False and decision["promoted"] is False and decision["compared"] is True
    assert decision["champion"]["run"] == good.run_dir.name
    page = (worse / "eval" / "report.html").read_text()
    assert "Gate failed." in page and "is worse than champion" in page

    assert main(["runs", str(runs), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["run"], r["status"], r["gate"], r["pointers"]) for r in rows] == [
        (good.run_dir.name, "complete", "passed", ["champion"]),
        (worse.name, "complete", "failed", ["latest"]),
    ]
    assert rows[0]["neg_elbo"] == theirs["neg_elbo"] and rows[1]["knn_accuracy"] == ours["knn_accuracy"]
    assert main(["runs", str(runs)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[0] == good.run_dir.name and table[1].endswith("passed  champion")
    assert table[2].endswith("failed  latest")


def test_mlflow_has_each_epoch_and_the_champion_alias(two_runs, mlflow_server):
    from mlflow import MlflowClient

    runs, good, _ = two_runs
    client = MlflowClient(mlflow_server.uri)
    tracking = record(good.run_dir)["tracking"]
    assert tracking["uri"] == mlflow_server.uri and "error" not in tracking
    history = client.get_metric_history(tracking["run_id"], "loss")
    assert [m.step for m in history] == [1, 2, 3]
    metrics = json.loads((good.run_dir / "train" / "metrics.jsonl").read_text().splitlines()[-1])
    assert history[-1].value == pytest.approx(metrics["loss"])
    run = client.get_run(tracking["run_id"])
    assert run.data.params["train.epochs"] == "3" and run.data.tags["gate"] == "passed"
    assert run.data.metrics["test.neg_elbo"] == pytest.approx(record(good.run_dir)["gate"]["metrics"]["neg_elbo"])
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(tracking["run_id"], "eval")}
    assert "eval/report.html" in artifacts
    version = client.get_model_version_by_alias("fashion-mnist-vae", "champion")
    assert version.version == tracking["model_version"] and version.tags["run"] == good.run_dir.name


def copy_runs(runs, target):
    shutil.copytree(runs, target, symlinks=True)
    return target


def test_promote_rolls_back_and_refuses_an_incomplete_run(two_runs, source, tmp_path, capsys, mlflow_server):
    from mlflow import MlflowClient

    runs = copy_runs(two_runs[0], tmp_path / "runs")
    good, worse = sorted(p.name for p in runs.glob("run-*"))
    assert main(["promote", str(runs / worse)]) == 0
    assert pointer(runs, "champion") == worse
    client = MlflowClient(mlflow_server.uri)
    assert client.get_model_version_by_alias("fashion-mnist-vae", "champion").tags["run"] == worse
    assert record(runs / worse)["gate"]["how"] == "manual"
    assert main(["promote", str(runs / good)]) == 0  # the rollback
    assert pointer(runs, "champion") == good
    assert client.get_model_version_by_alias("fashion-mnist-vae", "champion").tags["run"] == good

    # A run that failed (its batch does not fit the split: it stops after ingest).
    capsys.readouterr()
    assert cli_run(runs, source, "train.batch_size=100000") == 2
    [failed] = [p.name for p in runs.glob("run-*") if p.name not in (good, worse)]
    capsys.readouterr()
    assert main(["promote", str(runs / failed)]) == 2
    assert single_error_line(capsys.readouterr().err) == (
        f"vae-pipeline: error: {runs / failed}: the run is not complete (status: failed)"
    )
    assert pointer(runs, "champion") == good and pointer(runs, "latest") == worse


def test_pointers_hold_through_a_killed_run_and_a_failed_one(two_runs, source, tmp_path, capsys):
    runs = copy_runs(two_runs[0], tmp_path / "runs")
    before = {name: pointer(runs, name) for name in ("latest", "champion")}
    earlier = {p.name for p in runs.glob("run-*")}
    command = [sys.executable, "-m", "pipeline.cli", "run", "--runs-root", str(runs)]
    for item in settings(source, "train.epochs=8"):
        command += ["--set", item]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    killed = None
    while killed is None:
        assert process.poll() is None and time.monotonic() < deadline, "training never checkpointed"
        for run_dir in runs.glob("run-*"):
            if run_dir.name not in earlier and any((run_dir / "train" / "ray").glob("*/checkpoint_epoch_0001")):
                killed = run_dir
        time.sleep(0.5)
    # Mid-training: the pointers have not moved, and apps fetch the champion.
    assert {name: pointer(runs, name) for name in before} == before
    assert main(["fetch", str(runs / "champion"), "--out", str(tmp_path / "during")]) == 0
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert cli_run(runs, source, "train.batch_size=100000") == 2
    assert {name: pointer(runs, name) for name in before} == before
    assert main(["fetch", str(runs / "champion"), "--out", str(tmp_path / "after")]) == 0
    assert (tmp_path / "after" / "decoder.onnx").read_bytes() == (tmp_path / "during" / "decoder.onnx").read_bytes()
    capsys.readouterr()
    assert main(["runs", str(runs), "--json"]) == 0
    statuses = {row["run"]: row["status"] for row in json.loads(capsys.readouterr().out)}
    assert statuses[killed.name] == "killed"
    assert sorted(statuses.values()) == ["complete", "complete", "failed", "killed"]


@pytest.mark.parametrize("where", ["directory", "s3"])
def test_two_runs_promoting_at_once_end_with_the_better(two_runs, where, tmp_path, monkeypatch, request):
    """The worse run decides slowly (1 s between reading the champion and writing): without
    the lock or the conditional write it would overwrite the better run's promotion."""
    good, worse = sorted(p for p in two_runs[0].glob("run-*") if record(p)["status"] == "complete")
    if where == "directory":
        runs = tmp_path / "runs"
        for run_dir in (good, worse):
            shutil.copytree(run_dir, runs / run_dir.name, symlinks=True)
        root = str(runs)
    else:
        root = request.getfixturevalue("s3_bucket") + "/runs"
        for run_dir in (good, worse):
            Store.open(root).upload(run_dir, run_dir.name, skip=["train/ray"])
    locations = {run_dir.name: Store.open(root).uri(run_dir.name) for run_dir in (good, worse)}
    judge = gate.judge

    def slow_for_the_worse(numbers, config, champion=None):
        decision = judge(numbers, config, champion)
        if numbers["neg_elbo"] == record(worse)["gate"]["metrics"]["neg_elbo"]:
            time.sleep(1.0)
        return decision

    monkeypatch.setattr(promotion, "judge", slow_for_the_worse)
    config = load_config()
    outcomes = {}

    def finish(name):
        try:
            outcomes[name] = promotion.finish_run(locations[name], config, Pointers(root), Tracker(config))["passed"]
        except GateRejected:
            outcomes[name] = False

    threads = [threading.Thread(target=finish, args=(name,)) for name in (worse.name, good.name)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)  # the worse run reads the (empty) champion first
    for thread in threads:
        thread.join()
    assert outcomes[good.name] is True
    pointers = Pointers(root)
    assert pointers.read("champion") == good.name
    assert pointers.read("latest") == worse.name  # the later start


def test_a_tracking_server_that_dies_mid_run_costs_one_warning(source, tmp_path, caplog, ray_local):
    server = MlflowServer(tmp_path / "mlflow").start()
    runs = tmp_path / "runs"

    def kill_when_training():
        while not any(runs.glob("run-*/train/metrics.jsonl")):
            time.sleep(0.2)
        server.kill()

    killer = threading.Thread(target=kill_when_training, daemon=True)
    killer.start()
    # The largest seed the config allows (once an int32 overflow in the step's noise seeds).
    config = load_config(overrides=settings(source, "train.epochs=2", "seed=2147483647", f"tracking.uri={server.uri}"))
    result = run_pipeline(config, runs_root=runs)
    killer.join(timeout=5)
    assert result.record["status"] == "complete" and pointer(runs, "champion") == result.run_dir.name
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("pipeline")]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("tracking: cannot log")
    tracking = record(result.run_dir)["tracking"]
    assert tracking["uri"] == server.uri and tracking["error"].startswith("cannot log")
