import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.runs.run import run_pipeline
from pipeline.schema import RUN_FILE
from pipeline.storage import Store
from tests.helpers import REAL_DATA_DIR, has_real_data, write_idx_dir


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    if has_real_data():
        return REAL_DATA_DIR
    return write_idx_dir(tmp_path_factory.mktemp("idx"), 2048, 512)


def small(source, *extra):
    return [
        f"data.source=idx:{source}",
        "data.limit=512",
        "data.rows_per_file=128",
        # The preset's own latent_dim (2): the run must take it from the preset.
        "model.preset=seed",
        "train.epochs=1",
        "train.batch_size=64",
        "evaluate.iwae_k=2",
        *extra,
    ]


def statuses(run_dir):
    record = json.loads((run_dir / RUN_FILE).read_text())
    return {name: (s["status"], s.get("skipped", False)) for name, s in record["stages"].items()}, record


def test_a_failed_stage_keeps_earlier_outputs_then_the_run_completes_and_is_cached(tmp_path, source, ray_local):
    """One run through every stage (they take minutes here), checked at each turn: export
    fails; the rerun resumes there; a rerun skips everything; --force reruns a stage and
    what follows; a damaged dataset is rebuilt rather than taken as up to date. Its model
    has the continuous Bernoulli likelihood (the other pipeline tests, the Bernoulli), so
    that likelihood is trained, evaluated, exported and verified end to end too."""
    runs = tmp_path / "runs"
    cb = "model.likelihood=continuous_bernoulli"
    with pytest.raises(PipelineError, match="differs from Keras"):
        run_pipeline(load_config(overrides=small(source, cb, "export.tolerance=1e-30")), runs_root=runs)
    [run_dir] = runs.glob("run-*")
    stages, record = statuses(run_dir)
    assert record["status"] == "failed"
    assert stages["export"][0] == "failed" and stages["evaluate"] == ("complete", False)
    assert not (run_dir / "artifact").exists()

    config = load_config(overrides=small(source, cb))
    result = run_pipeline(config, runs_root=runs, run_dir=run_dir)
    assert (result.artifact / "decoder.onnx").is_file()
    report = json.loads((result.run_dir / "eval" / "report.json").read_text())
    assert report["test"]["likelihood"] == "continuous_bernoulli" and report["context"]["reconstruction_floor"] is None
    assert "continuous Bernoulli" in (result.run_dir / "eval" / "report.html").read_text()
    card = json.loads((result.artifact / "model_card.json").read_text())
    assert card["likelihood"] == "continuous_bernoulli" and card["verification"]["max_abs_difference"]["decoder"] < 1e-5
    stages, record = statuses(result.run_dir)
    assert record["status"] == "complete" and record["artifact"] == str(result.artifact)
    assert [stages[n] for n in ("ingest", "train", "evaluate")] == [("complete", True)] * 3
    assert stages["export"] == ("complete", False)
    assert record["config"]["train"]["epochs"] == 1
    assert all(len(s["output_sha256"]) == 64 for s in record["stages"].values())
    assert (runs / "latest").resolve() == result.run_dir.resolve()
    from pipeline.cli import main

    assert main(["fetch", str(runs / "latest"), "--out", str(tmp_path / "fetched")]) == 0
    assert (tmp_path / "fetched" / "decoder.onnx").read_bytes() == (result.artifact / "decoder.onnx").read_bytes()

    again = run_pipeline(config, runs_root=runs, run_dir=result.run_dir)
    stages, _ = statuses(again.run_dir)
    assert all(skipped for _, skipped in stages.values())

    forced = run_pipeline(config, runs_root=runs, run_dir=result.run_dir, force="export")
    stages, _ = statuses(forced.run_dir)
    assert stages["evaluate"] == ("complete", True) and stages["export"] == ("complete", False)

    # A Parquet file truncated inside the finished run: the dataset is rebuilt (its
    # manifest comes out the same, so later stages stay cached), never "up to date".
    part = sorted((result.run_dir / "data" / "train").iterdir())[0]
    part.write_bytes(part.read_bytes()[:-100])
    healed = run_pipeline(config, runs_root=runs, run_dir=result.run_dir)
    stages, _ = statuses(healed.run_dir)
    assert stages["ingest"] == ("complete", False)
    assert [stages[n] for n in ("train", "evaluate", "export")] == [("complete", True)] * 3
    from pipeline.data.dataset import check_dataset

    check_dataset(result.run_dir / "data", full=True)


def test_unknown_force_stage_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match="unknown stage 'trian'"):
        run_pipeline(load_config(), run_dir=tmp_path / "run", force="trian")


def test_run_killed_mid_train_is_resumed_not_taken_as_complete(s3_bucket, source):
    """The driver SIGKILLed mid-training, its run in an object store: `run --run-dir` with
    the same URI (from any machine) resumes from the checkpoint the workers wrote there."""
    run = f"{s3_bucket}/run"
    store = Store.open(run)
    overrides = small(source, "train.epochs=6", "data.limit=1024")
    command = [sys.executable, "-m", "pipeline.cli", "run", "--run-dir", run]
    for item in overrides:
        command += ["--set", item]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not any("checkpoint_epoch_0001/" in name for name in store.list_files("train/ray")):
        assert process.poll() is None and time.monotonic() < deadline, "training never checkpointed"
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    record = store.read_json(RUN_FILE)
    assert record["stages"]["train"]["status"] == "running"
    assert record["stages"]["ingest"]["status"] == "complete"
    assert store.read_bytes("train/train.json") is None

    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"artifact: {run}/artifact"
    assert "run: ingest: up to date, skipped" in result.stderr
    summary = store.read_json("train/train.json")
    assert summary["resumed_from"].startswith(f"{s3_bucket}/run/train/ray/")
    assert summary["worker_group_starts"][0] >= 2
    assert summary["epochs"] == 6
    assert store.read_json(RUN_FILE)["status"] == "complete"
    assert "decoder.onnx" in store.list_files("artifact")


def test_a_directory_that_is_not_a_run_is_refused_untouched(tmp_path, capsys):
    from pipeline.cli import main
    from tests.helpers import single_error_line, tree_snapshot

    target = tmp_path / "documents"
    target.mkdir()
    (target / "run.json").write_text('{"mine": true}')
    (target / "data").mkdir()
    (target / "data" / "notes.txt").write_text("keep")
    before = tree_snapshot(target)
    assert main(["run", "--run-dir", str(target)]) == 2
    assert "not a run directory of this pipeline" in single_error_line(capsys.readouterr().err)
    assert tree_snapshot(target) == before


def test_a_latest_that_is_not_a_link_is_never_replaced(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "latest").write_text("my notes, not a link")
    with pytest.raises(PipelineError, match="latest: exists and is not a symbolic link"):
        run_pipeline(load_config(), runs_root=runs)
    assert (runs / "latest").read_text() == "my notes, not a link"
    assert sorted(p.name for p in runs.iterdir()) == ["latest"]
