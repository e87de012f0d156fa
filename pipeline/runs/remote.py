"""`vae-pipeline run` with its run directory in an object store (`s3://`, `gs://`).

The stages run as for a local run, in a staging directory on this machine (a new
temporary directory, removed at the end); the store holds the run:

- Before the stages, the store's run.json is read and the outputs of the stages it
  records complete are downloaded. The cache check then runs on those copies: an output
  whose upload was cut off fails its hashes and is made again.
- When a stage finishes, its directory is uploaded, and only then is run.json rewritten
  with the stage complete. A stage whose upload was cut off stays "running" there.
- Training's checkpoints never pass through the staging directory: Ray Train writes them
  from the workers straight to RUN/train/ray, so a worker on any node can write them and
  a run started again (anywhere) resumes from them.
- Ray Data reads the dataset from RUN/data in the store, so no node needs this one's disk.
- RUNS/latest and RUNS/champion are objects naming runs, moved once the run is complete
  (pipeline.runs.pointers, pipeline.runs.promotion).

A run location must be new, empty, or hold this pipeline's run.json; anything else is
refused untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.files import write_json
from pipeline.runs.loop import RecordSink, RunObserver, RunResult, is_run_record, run_stages
from pipeline.schema import RAY_STORAGE_DIR, RUN_FILE, RUN_FORMAT
from pipeline.stages import STAGES, Stage, stage, stages_from
from pipeline.storage import Store, join

log = logging.getLogger(__name__)


class StoreSink(RecordSink):
    """Mirrors run.json and each finished stage into the run's store."""

    def __init__(self, store: Store):
        self.store = store
        self.location = store.location

    def record(self, record: dict[str, Any]) -> None:
        self.store.write_json(RUN_FILE, record)

    def stage(self, spec: Stage, directory: Path) -> None:
        relative = spec.directory
        started = time.monotonic()
        files = self.store.upload(directory, relative, skip=spec.kept_in_store)
        log.info(
            "run: %s: uploaded %d files to %s in %.1f s",
            spec.name,
            len(files),
            self.store.uri(relative),
            time.monotonic() - started,
        )

    def data_location(self, data_dir: Path) -> str:
        return self.store.uri(stage("ingest").directory)


def new_run_location(runs_root: str) -> str:
    """A new `run-YYYYmmdd-HHMMSS[-N]` location under `runs_root`."""
    root = Store.open(runs_root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = f"run-{stamp}", 1
    while root.list_files(name):
        name, n = f"run-{stamp}-{n}", n + 1
    return root.uri(name)


def read_run_record(store: Store) -> dict[str, Any] | None:
    """The run.json at `store`, None for a new or empty location; PipelineError for
    anything that is not this pipeline's run."""
    record = store.read_json(RUN_FILE)
    if record is None and store.is_empty():
        return None
    if not is_run_record(record):
        raise PipelineError(
            f"{store.location}: not a run of this pipeline (no {RUN_FILE} of format {RUN_FORMAT}); "
            "refusing to write into it"
        )
    return record


def fetch_completed(store: Store, record: dict[str, Any], staging: Path, force: str | None) -> None:
    """Download the outputs of the stages run.json records complete (not the forced ones)."""
    forced = stages_from(force)
    for spec in STAGES:
        entry = record.get("stages", {}).get(spec.name, {})
        if entry.get("status") != "complete" or spec.name in forced:
            continue
        started = time.monotonic()
        files = store.download(spec.directory, staging / spec.directory, skip=spec.kept_in_store)
        log.info(
            "run: %s: fetched %d files of its recorded output in %.1f s",
            spec.name,
            len(files),
            time.monotonic() - started,
        )


def run_remote(config: Config, run_location: str, force: str | None, verbose: bool, observer: RunObserver) -> RunResult:
    """`run_pipeline` for a run in an object store (see the module docstring)."""
    store = Store.open(run_location)
    record = read_run_record(store)
    if config.train.storage_path is None:
        storage = join(run_location, stage("train").directory, RAY_STORAGE_DIR)
        config = config.replace(train=dataclasses.replace(config.train, storage_path=storage))
    staging = Path(tempfile.mkdtemp(prefix="vae-pipeline-staging-"))
    try:
        if record is not None:
            fetch_completed(store, record, staging, force)
            write_json(staging / RUN_FILE, record)
        log.info("run: %s (stages run in %s)", run_location, staging)
        return run_stages(config, staging, force, verbose, StoreSink(store), observer)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
