"""Runs in an object store: a real S3 server on loopback (moto), reached through pyarrow.fs."""

import json
import logging
import re
import threading
import time

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.dataset import check_dataset
from pipeline.errors import PipelineError
from pipeline.runs.listing import list_runs
from pipeline.runs.remote import StoreSink
from pipeline.runs.run import run_pipeline
from pipeline.schema import MODEL_DIR, TRAIN_SUMMARY_FILE
from pipeline.stages.train import train
from pipeline.storage import RETRY_ENV, Store, request_timeout_s
from tests.helpers import PauseAtEpoch, single_error_line, write_idx_dir
from tests.s3 import HungServer


def make_tree(root, files):
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_upload_and_download_round_trip(s3_bucket, tmp_path):
    files = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 100, ".hidden.json": b"{}"}
    store = Store.open(f"{s3_bucket}/x")
    assert store.upload(make_tree(tmp_path / "src", files), "d") == sorted(files)
    assert store.list_files("d") == sorted(files)
    store.download("d", tmp_path / "back")
    assert {name: (tmp_path / "back" / name).read_bytes() for name in files} == files


def test_an_upload_replaces_the_stage_but_keeps_what_lives_only_in_the_store(s3_bucket, tmp_path):
    store = Store.open(s3_bucket)
    store.upload(make_tree(tmp_path / "one", {"old.txt": b"1", "ray/ckpt": b"c", "keep.txt": b"k"}), "train")
    store.upload(make_tree(tmp_path / "two", {"keep.txt": b"K"}), "train", skip=["ray"])
    assert store.list_files("train") == ["keep.txt", "ray/ckpt"]
    assert store.read_bytes("train/keep.txt") == b"K"


def test_a_missing_bucket_is_one_line_without_waiting(s3_server, source):
    started = time.monotonic()
    with pytest.raises(PipelineError) as info:
        run_pipeline(short_run(source), runs_root="s3://no-such-bucket-here/runs")
    assert re.fullmatch(
        r"s3://no-such-bucket-here/runs/run-[0-9-]+/run.json: cannot write: AWS Error NO_SUCH_BUCKET .*: "
        r"The specified bucket does not exist",
        str(info.value),
    )
    assert time.monotonic() - started < 5


# A run whose training is refused before Ray starts (a batch larger than the split): the
# real ingest stage runs and is uploaded, and the run stops at once after it.
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_idx_dir(tmp_path_factory.mktemp("idx"), 256, 64)


def short_run(source):
    return load_config(
        overrides=[f"data.source=idx:{source}", "data.limit=256", "data.rows_per_file=64", "train.batch_size=100000"]
    )


def remote_record(location):
    return Store.open(location).read_json("run.json")


def test_each_stage_is_uploaded_before_run_json_says_complete(s3_bucket, source, tmp_path, capsys):
    with pytest.raises(PipelineError, match="does not fit the training split"):
        run_pipeline(short_run(source), runs_root=f"{s3_bucket}/runs")
    # A failed run moves no pointer; `runs` lists it.
    assert Store.open(f"{s3_bucket}/runs").read_bytes("latest") is None
    [row] = list_runs(f"{s3_bucket}/runs")
    location = row["location"]
    assert row["status"] == "failed" and row["pointers"] == []
    record = remote_record(location)
    assert record["status"] == "failed" and record["error"].startswith("train.batch_size 100000")
    assert record["stages"]["ingest"]["status"] == "complete"
    assert record["stages"]["ingest"]["output"] == f"{location}/data"
    assert record["stages"]["train"]["status"] == "failed"
    assert record["config"]["train"]["storage_path"] == f"{location}/train/ray"
    Store.open(location).download("data", tmp_path / "data")
    assert check_dataset(tmp_path / "data", full=True)["rows"] == {"train": 256, "test": 64}

    assert main(["fetch", location, "--out", str(tmp_path / "model")]) == 2
    assert single_error_line(capsys.readouterr().err) == (
        f"vae-pipeline: error: {location}: its export stage is not complete (run status: failed); nothing to fetch"
    )
    assert main(["fetch", f"{s3_bucket}/runs/champion", "--out", str(tmp_path / "model")]) == 2
    assert single_error_line(capsys.readouterr().err) == (
        f"vae-pipeline: error: {s3_bucket}/runs/champion: no run is recorded there"
    )
    assert not (tmp_path / "model").exists()


def test_an_outage_during_an_upload_is_ridden_out(s3_server, s3_bucket, source, monkeypatch, caplog, tmp_path):
    """Longer than the S3 client's own retries (about 6 s), shorter than the pipeline's."""
    upload = StoreSink.stage

    def stage_during_outage(self, name, directory):
        timer = s3_server.outage(8.0)
        try:
            upload(self, name, directory)
        finally:
            timer.join()

    monkeypatch.setattr(StoreSink, "stage", stage_during_outage)
    with (
        caplog.at_level(logging.WARNING, logger="pipeline.storage"),
        pytest.raises(PipelineError, match="does not fit"),
    ):
        run_pipeline(short_run(source), run_dir=f"{s3_bucket}/run")
    assert "retrying for up to 60 s" in caplog.text
    record = remote_record(f"{s3_bucket}/run")
    assert record["stages"]["ingest"]["status"] == "complete"
    Store.open(f"{s3_bucket}/run").download("data", tmp_path / "data")
    assert check_dataset(tmp_path / "data", full=True)["content_sha256"]


def test_an_upload_cut_off_is_never_taken_as_complete(s3_server, s3_bucket, source, monkeypatch, caplog):
    upload, location = StoreSink.stage, f"{s3_bucket}/run"

    def cut_off(self, name, directory):
        self.store.write_text("data/partial-upload", "the first file of an upload")
        timer = s3_server.outage(9.0)
        monkeypatch.setenv(RETRY_ENV, "1")
        try:
            upload(self, name, directory)
        finally:
            timer.join()

    monkeypatch.setattr(StoreSink, "stage", cut_off)
    with pytest.raises(PipelineError, match="storage unreachable for 1 s") as info:
        run_pipeline(short_run(source), run_dir=location)
    assert "\n" not in str(info.value)
    # (The store was back by the time the failure was recorded; had it not been, the
    # stage would still read "running".)
    ingest = remote_record(location)["stages"]["ingest"]
    assert ingest["status"] == "failed" and "storage unreachable" in ingest["error"]

    # Run again: the stage is made and uploaded again, the partial upload replaced.
    monkeypatch.setattr(StoreSink, "stage", upload)
    monkeypatch.delenv(RETRY_ENV)
    with pytest.raises(PipelineError, match="does not fit"):
        run_pipeline(short_run(source), run_dir=location)
    record = remote_record(location)
    assert record["stages"]["ingest"]["status"] == "complete"
    assert "partial-upload" not in Store.open(location).list_files("data")

    # An object damaged after the stage was recorded complete: the cache check's hashes
    # catch it and the stage is made again.
    store = Store.open(location)
    part = next(name for name in store.list_files("data") if name.endswith(".parquet"))
    store.write_text(f"data/{part}", "not parquet")
    with (
        caplog.at_level(logging.WARNING, logger="pipeline.runs.loop"),
        pytest.raises(PipelineError, match="does not fit"),
    ):
        run_pipeline(short_run(source), run_dir=location)
    assert "ingest: its output is damaged, running it again" in caplog.text
    assert store.read_bytes(f"data/{part}") != b"not parquet"


def test_a_location_that_is_not_a_run_is_refused_untouched(s3_bucket, source):
    store = Store.open(f"{s3_bucket}/theirs")
    store.write_text("notes.txt", "someone else's")
    with pytest.raises(PipelineError, match=r"theirs: not a run of this pipeline .* refusing to write into it"):
        run_pipeline(short_run(source), run_dir=store.location)
    assert store.list_files() == ["notes.txt"]
    Store.open(f"{s3_bucket}/runs").write_text("latest", "their own latest")
    with pytest.raises(PipelineError, match="runs/latest: exists and was not written by vae-pipeline"):
        run_pipeline(short_run(source), runs_root=f"{s3_bucket}/runs")
    assert Store.open(f"{s3_bucket}/runs").list_files() == ["latest"]
    assert json.dumps(Store.open(f"{s3_bucket}/runs").read_bytes("latest").decode()) == '"their own latest"'


@pytest.fixture
def hung_store(monkeypatch):
    """An S3 endpoint that accepts connections and never answers (a hung server), with a
    6 s retry limit."""
    server = HungServer()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.port}")
    monkeypatch.setenv(RETRY_ENV, "6")
    yield 6.0, server.held
    server.close()


def test_a_hung_store_stops_within_the_limit_across_many_files(hung_store, tmp_path, capsys):
    """The limit counts the outage, not each file: an upload of six files and a fetch each
    end in one line about one limit (plus one request's timeout) after the store hung,
    where each file once had the whole limit to itself."""
    limit, held = hung_store
    files = make_tree(tmp_path / "artifact", {f"part-{i}.bin": b"x" * 100 for i in range(6)})
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"storage unreachable for [0-9]+ s") as info:
        Store.open("s3://hung/runs/run-1").upload(files, "artifact")
    upload_s = time.monotonic() - started
    assert held, "the upload never reached the hung endpoint"
    assert "s3://hung/runs/run-1/artifact/part-0.bin: cannot write" in str(info.value)

    started = time.monotonic()
    assert main(["fetch", "s3://hung/runs/run-1", "--out", str(tmp_path / "model")]) == 2
    fetch_s = time.monotonic() - started
    line = single_error_line(capsys.readouterr().err)
    assert line.startswith("vae-pipeline: error: s3://hung/runs/run-1/run.json: cannot read: storage unreachable")
    assert not (tmp_path / "model").exists()
    assert held, "no request reached the hung endpoint"
    bound = limit + request_timeout_s(limit) + 1  # the last attempt may start just inside the limit
    print(f"hung store, limit {limit:.0f} s: upload stopped after {upload_s:.1f} s, fetch after {fetch_s:.1f} s")
    assert upload_s < bound and fetch_s < bound, (upload_s, fetch_s, bound)


@pytest.mark.parametrize("outage", ["down", "hung"])
def test_a_store_lost_during_training_stops_it_within_the_limit(
    outage, s3_server, s3_bucket, small_dataset, ray_local, monkeypatch, tmp_path
):
    """Ray Train's checkpoints in an object store that goes away after the first epoch
    (stopped, or answering nothing): one line about one limit later, naming the
    checkpoint, though Ray Train may restart its workers twice; no model is written.
    Ray Train's own upload once let this run 131 s against a 60 s limit."""
    limit = 6.0
    monkeypatch.setenv(RETRY_ENV, str(limit))  # set at the driver: the workers get it from there
    storage = f"{s3_bucket}/checkpoints"
    overrides = ["model.preset=seed", "model.latent_dim=4", "train.batch_size=64", "train.epochs=3"]
    config = load_config(overrides=[*overrides, f"train.storage_path={storage}", "train.max_failures=2"])
    handshake, out, lost = tmp_path / "handshake", tmp_path / "run", {}
    handshake.mkdir()

    def lose_the_store():
        while not (handshake / "asked").exists():  # rank 0 is at the start of epoch 2
            time.sleep(0.05)
        # Ray Train's controller has registered epoch 1's checkpoint (its only write).
        while not any(name.endswith("checkpoint_manager_snapshot.json") for name in Store.open(storage).list_files()):
            time.sleep(0.1)
        s3_server.stop()
        lost["at"] = time.monotonic()
        if outage == "hung":
            lost["hung"] = HungServer(s3_server.port)
        (handshake / "done").touch()

    thread = threading.Thread(target=lose_the_store, daemon=True)
    thread.start()
    try:
        with pytest.raises(PipelineError) as info:
            train(config, small_dataset, out, epoch_hook=PauseAtEpoch(str(handshake), epoch=1))
        stopped_s = time.monotonic() - lost["at"]
    finally:
        thread.join(timeout=60)
        if "hung" in lost:
            lost["hung"].close()
        s3_server.start()
    message = str(info.value)
    assert "\n" not in message
    assert re.match(
        rf"{storage}/vae-[0-9-]+/checkpoint_epoch_0001/[^ ]+: cannot write: storage unreachable for [0-9]+ s", message
    ), message
    bound = limit + request_timeout_s(limit) + 10  # + an epoch of 1,024 images and a last report
    print(f"store {outage} during training, limit {limit:.0f} s: stopped {stopped_s:.1f} s after it went")
    assert stopped_s < bound, (stopped_s, bound)
    assert not (out / MODEL_DIR).exists() and not (out / TRAIN_SUMMARY_FILE).exists()
    # Epoch 1's checkpoint is whole in the store, to resume from.
    names = Store.open(storage).list_files()
    assert any(re.search(r"checkpoint_epoch_0000/vae.keras$", name) for name in names), names
