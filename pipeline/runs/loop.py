"""The run loop: every stage of `pipeline.stages.STAGES` in order, in one run directory.

Each stage's inputs (its config sections and the upstream outputs' hashes) give it a
key. A stage whose key matches a completed record in run.json, and whose output still
hashes the same and passes its stage's `check_done` (for the dataset, its content hash
recomputed), is skipped; a damaged output is rebuilt. A failed or killed stage is never
recorded complete: the next run starts again there (training resumes from its latest
checkpoint).

Layout: RUN/run.json, then each stage's directory (RUN/data/, RUN/train/, RUN/eval/,
RUN/artifact/). Where the run lives (a directory, or an object store through a staging
directory) is chosen once, above this loop, by pipeline.runs.run; a `RecordSink` is how
the loop tells that place what it wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.artifact import sha256_file
from pipeline import __version__
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.files import read_json, write_json
from pipeline.outputs import read_marker
from pipeline.schema import RUN_FILE, RUN_FORMAT
from pipeline.stages import STAGE_NAMES, STAGES, Stage, StageRun, stage, stages_from
from pipeline.storage import join

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path | None  # None for a run in an object store (its staging copy is gone)
    record: dict[str, Any]
    location: str  # the run directory or URI

    @property
    def artifact(self) -> Path:
        if self.run_dir is None:
            raise ValueError(f"{self.location} is not a local run; use artifact_location")
        return self.run_dir / stage("export").directory

    @property
    def artifact_location(self) -> str:
        return join(self.location, stage("export").directory)


class RecordSink:
    """Where run.json and finished stage outputs go besides the run directory: nowhere
    for a local run; pipeline.runs.remote's object-store copy for a remote one."""

    location: str | None = None  # what the record and the user see as the run's place

    def record(self, record: dict[str, Any]) -> None:
        """run.json was rewritten."""

    def stage(self, spec: Stage, directory: Path) -> None:
        """A stage finished writing `directory`; called before run.json says it is complete."""

    def data_location(self, data_dir: Path) -> str | None:
        """Where Ray Data should read the dataset (None: the local directory)."""
        return None


class RunObserver:
    """Who follows a run as it goes (pipeline.runs.tracking): told when it starts, each
    epoch's metrics as they reach the driver, each stage whose output is ready (run or
    cached), and the end. The loop never waits on or fails because of an observer."""

    def run_started(self, location: str, record: dict[str, Any]) -> None:
        """The run began (or resumed); `record` is its run.json."""

    def epoch(self, metrics: dict[str, Any]) -> None:
        """A training epoch ended."""

    def stage_ready(self, spec: Stage, directory: Path) -> None:
        """A stage's output is complete in `directory`."""

    def run_ended(self, record: dict[str, Any]) -> None:
        """The run stopped: `record["status"]` says how."""


def stage_key(spec: Stage, config: Config, record: dict[str, Any]) -> str:
    """Hash of the stage's config sections and its upstream stages' output hashes."""
    inputs: dict[str, Any] = config.inputs(spec.sections)
    inputs["upstream"] = {up: record["stages"][up]["output_sha256"] for up in spec.upstream}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def is_run_record(value: Any) -> bool:
    return isinstance(value, dict) and value.get("format") == RUN_FORMAT


def load_record(run_dir: Path, config: Config) -> dict[str, Any]:
    path = run_dir / RUN_FILE
    record = read_json(path) if path.is_file() else {"stages": {}}
    record.update(
        {
            "format": RUN_FORMAT,
            "config": config.to_dict(),
            "versions": {"pipeline": __version__, "python": platform.python_version()},
            "git_commit": git_commit(),
            "status": "running",
            "pid": os.getpid(),
            "host": platform.node(),
        }
    )
    return record


def output_sha256(run_dir: Path, spec: Stage) -> str | None:
    path = run_dir / spec.directory / spec.output_file
    return sha256_file(path) if path.is_file() else None


def check_stage_output(directory: Path, spec: Stage) -> None:
    """The checks that let a completed stage's output be reused; PipelineError if one fails."""
    marker = read_marker(directory)
    if marker is None or marker.get("stage") != spec.name:
        raise PipelineError(f"{directory}: not the {spec.name} stage's output")
    spec.module().check_done(directory)


def error_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class Run:
    """One pass of the loop over a run directory: its record, and where it is mirrored."""

    def __init__(self, config: Config, run_dir: Path, sink: RecordSink, verbose: bool, observer: RunObserver):
        self.config, self.run_dir, self.sink, self.verbose = config, run_dir, sink, verbose
        self.observer = observer
        self.location = sink.location or str(run_dir)
        self.record = load_record(run_dir, config)
        self.record.setdefault("started", time.time())

    def save(self) -> None:
        write_json(self.run_dir / RUN_FILE, self.record)
        self.sink.record(self.record)

    def is_cached(self, spec: Stage, key: str) -> bool:
        """The stage completed with these inputs and its output is still intact."""
        entry = self.record["stages"].get(spec.name, {})
        if not (
            entry.get("status") == "complete"
            and entry.get("key") == key
            and entry.get("output_sha256") is not None
            and output_sha256(self.run_dir, spec) == entry["output_sha256"]
        ):
            return False
        try:
            check_stage_output(self.run_dir / spec.directory, spec)
        except (PipelineError, OSError) as exc:
            log.warning("run: %s: its output is damaged, running it again: %s", spec.name, exc)
            return False
        return True

    def can_resume(self, spec: Stage, key: str) -> bool:
        """An interrupted stage with the same inputs that can continue (training, from a
        checkpoint) does; the stage module says whether it can."""
        entry = self.record["stages"].get(spec.name, {})
        can_resume = getattr(spec.module(), "can_resume", None)
        if can_resume is None or entry.get("key") != key or entry.get("status") == "complete":
            return False
        config = Config.from_dict(entry["config"]) if "config" in entry else Config()
        return can_resume(self.run_dir / spec.directory, config)

    def execute(self, spec: Stage, key: str, resume: bool) -> None:
        """Run one stage, recording it running, then failed or complete."""
        started = time.time()
        entry = {
            "status": "running",
            "key": key,
            "started": started,
            "output": join(self.location, spec.directory),
            "inputs": {up: self.record["stages"][up]["output_sha256"] for up in spec.upstream},
            "config": self.config.to_dict(),
        }
        previous_output = self.record["stages"].get(spec.name, {}).get("output_sha256")
        self.record["stages"][spec.name] = entry
        self.save()
        log.info("run: %s: %s", spec.name, "resuming from its latest checkpoint" if resume else "running")
        try:
            parquet = self.sink.data_location(self.run_dir / stage("ingest").directory)
            spec.module().run_in(
                StageRun(self.config, self.run_dir, resume, self.verbose, parquet, on_epoch=self.observer.epoch)
            )
            output = output_sha256(self.run_dir, spec)
            # Uploaded (for a remote run) before run.json may say complete: an upload cut
            # off leaves the stage "running", never complete.
            self.sink.stage(spec, self.run_dir / spec.directory)
        except BaseException as exc:
            entry.update(status="failed", ended=time.time(), error=error_line(exc))
            with contextlib.suppress(PipelineError):
                self.save()
            raise
        entry.update(status="complete", ended=time.time(), seconds=time.time() - started, output_sha256=output)
        if output != previous_output:
            # Later stages were made from another output: stale. (Their keys would say so
            # too; dropping them keeps run.json honest.) An identical output, such as a
            # damaged dataset rebuilt from the same source, keeps them.
            for later in STAGE_NAMES[STAGE_NAMES.index(spec.name) + 1 :]:
                self.record["stages"].pop(later, None)
        self.save()
        log.info("run: %s: done in %.0f s", spec.name, entry["seconds"])

    def walk(self, force: str | None) -> None:
        """Every stage in order: skipped when cached (unless forced), else run."""
        forced = stages_from(force)
        for spec in STAGES:
            key = stage_key(spec, self.config, self.record)
            if spec.name not in forced and self.is_cached(spec, key):
                log.info("run: %s: up to date, skipped", spec.name)
                self.record["stages"][spec.name]["skipped"] = True
            else:
                self.execute(spec, key, spec.name not in forced and self.can_resume(spec, key))
            self.observer.stage_ready(spec, self.run_dir / spec.directory)


def run_stages(
    config: Config,
    run_dir: Path,
    force: str | None,
    verbose: bool,
    sink: RecordSink | None = None,
    observer: RunObserver | None = None,
) -> RunResult:
    """The stages in `run_dir`, which exists and may hold an earlier run.json."""
    run = Run(config, run_dir, sink or RecordSink(), verbose, observer or RunObserver())
    run.save()
    run.observer.run_started(run.location, run.record)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        run.walk(force)
        run.record["status"] = "complete"
    except BaseException as exc:
        run.record["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        run.record["error"] = error_line(exc)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        run.record["ended"] = time.time()
        run.record.pop("pid", None)
        run.record.pop("host", None)
        # A failed final write must not hide the error that ended the run.
        complete = run.record["status"] == "complete"
        with contextlib.nullcontext() if complete else contextlib.suppress(PipelineError):
            run.save()
        run.observer.run_ended(run.record)
    run.record["artifact"] = join(run.location, stage("export").directory)
    run.save()
    return RunResult(None if run.sink.location else run_dir, run.record, run.location)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
