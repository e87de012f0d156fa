"""`vae-pipeline run`: ingest -> train -> evaluate -> export in one run directory.

Each stage's inputs (its config sections and the upstream outputs' hashes) give it a
key. A stage whose key matches a completed record in run.json, and whose output still
hashes the same and passes its stage's checks (for the dataset, its content hash
recomputed), is skipped; a damaged output is rebuilt. A failed or killed stage is never
recorded complete: the next run starts again there (training resumes from its latest
checkpoint). RUN must be new, empty or a run directory; RUNS/latest is replaced only
when it is a symbolic link.

Layout: RUN/run.json, RUN/data/, RUN/train/, RUN/eval/, RUN/artifact/; RUNS/latest
points at the newest run. RUNS or RUN may be an object-store URI: pipeline.remote_run.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.artifact import sha256_file
from pipeline import __version__
from pipeline.atomic import write_json
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.schema import (
    CHECKSUMS_FILE,
    MANIFEST_FILE,
    MODEL_DIR,
    MODEL_FILE,
    REPORT_JSON,
    RUN_FORMAT,
    TRAIN_SUMMARY_FILE,
)
from pipeline.storage import is_uri, join

log = logging.getLogger(__name__)

STAGES = ("ingest", "train", "evaluate", "export")
RUN_FILE = "run.json"
LATEST = "latest"


@dataclass(frozen=True)
class Stage:
    name: str
    directory: str
    sections: tuple[str, ...]  # config sections that are this stage's inputs
    output_file: str  # the file whose hash stands for the stage's output


STAGE_SPECS = {
    "ingest": Stage("ingest", "data", ("data",), MANIFEST_FILE),
    "train": Stage("train", "train", ("seed", "model", "train"), f"{MODEL_DIR}/{MODEL_FILE}"),
    "evaluate": Stage("evaluate", "eval", ("seed", "evaluate"), REPORT_JSON),
    "export": Stage("export", "artifact", ("seed", "export"), CHECKSUMS_FILE),
}
UPSTREAM = {"ingest": (), "train": ("ingest",), "evaluate": ("ingest", "train"), "export": ("ingest", "train", "evaluate")}
# Settings that change where or how fast a stage runs, not what it produces.
NOT_INPUTS = {"train": ("storage_path", "steps_per_execution", "fault_at_epoch", "max_failures", "checkpoints_to_keep")}


@dataclass(frozen=True)
class RunResult:
    run_dir: Path | None  # None for a run in an object store (its staging copy is gone)
    record: dict[str, Any]
    location: str  # the run directory or URI

    @property
    def artifact(self) -> Path:
        if self.run_dir is None:
            raise ValueError(f"{self.location} is not a local run; use artifact_location")
        return self.run_dir / STAGE_SPECS["export"].directory

    @property
    def artifact_location(self) -> str:
        return join(self.location, STAGE_SPECS["export"].directory)


def stage_key(name: str, config: Config, record: dict[str, Any]) -> str:
    """Hash of the stage's config sections and its upstream stages' output hashes."""
    data = config.to_dict()
    inputs: dict[str, Any] = {}
    for section in STAGE_SPECS[name].sections:
        value = data[section]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in NOT_INPUTS.get(name, ())}
        inputs[section] = value
    inputs["upstream"] = {up: record["stages"][up]["output_sha256"] for up in UPSTREAM[name]}
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


def choose_run_dir(runs_root: Path, run_dir: Path | None) -> Path:
    """The given run directory, else a new timestamped one under `runs_root`."""
    if run_dir is not None:
        return Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = Path(runs_root) / f"run-{stamp}", 1
    while candidate.exists():
        candidate, n = Path(runs_root) / f"run-{stamp}-{n}", n + 1
    return candidate


def check_latest(runs_root: Path) -> None:
    """RUNS/latest may be absent or a symbolic link; anything else is not ours to replace."""
    link = Path(runs_root) / LATEST
    if os.path.lexists(link) and not link.is_symlink():
        raise PipelineError(f"{link}: exists and is not a symbolic link; refusing to replace it")


def check_run_dir(run_dir: Path) -> None:
    """A run directory must be new, empty, or hold a run.json this pipeline wrote."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise PipelineError(f"{run_dir}: exists and is not a directory")
    if not any(run_dir.iterdir()):
        return
    path = run_dir / RUN_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise PipelineError(
            f"{run_dir}: not a run directory of this pipeline (no {RUN_FILE} of format {RUN_FORMAT}); "
            "refusing to write into it"
        )


def point_latest(runs_root: Path, run_dir: Path) -> None:
    """Atomically repoint RUNS/latest at `run_dir` (a relative symlink)."""
    link = Path(runs_root) / LATEST
    tmp = link.with_name(f".{LATEST}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(run_dir.resolve(), link.parent.resolve()), tmp)
    os.replace(tmp, link)


def load_record(run_dir: Path, config: Config) -> dict[str, Any]:
    path = run_dir / RUN_FILE
    record = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
    record.update(
        {
            "format": RUN_FORMAT,
            "config": config.to_dict(),
            "versions": {"pipeline": __version__, "python": platform.python_version()},
            "git_commit": git_commit(),
            "status": "running",
            "pid": os.getpid(),
        }
    )
    return record


def output_sha256(run_dir: Path, name: str) -> str | None:
    path = run_dir / STAGE_SPECS[name].directory / STAGE_SPECS[name].output_file
    return sha256_file(path) if path.is_file() else None


def is_cached(run_dir: Path, record: dict[str, Any], name: str, key: str) -> bool:
    """The stage completed with these inputs and its output is still intact."""
    entry = record["stages"].get(name, {})
    if not (
        entry.get("status") == "complete"
        and entry.get("key") == key
        and entry.get("output_sha256") is not None
        and output_sha256(run_dir, name) == entry["output_sha256"]
    ):
        return False
    try:
        check_stage_output(run_dir / STAGE_SPECS[name].directory, name)
    except (PipelineError, OSError) as exc:
        log.warning("run: %s: its output is damaged, running it again: %s", name, exc)
        return False
    return True


def check_stage_output(directory: Path, name: str) -> None:
    """The checks that let a completed stage's output be reused; PipelineError if one fails."""
    from pipeline.outputs import read_marker

    marker = read_marker(directory)
    if marker is None or marker.get("stage") != name:
        raise PipelineError(f"{directory}: not the {name} stage's output")
    if name == "ingest":
        from pipeline.dataset import check_dataset

        check_dataset(directory, full=True)
    elif name == "train":
        from pipeline.model_store import check_model_dir

        check_model_dir(directory)
        if not (directory / TRAIN_SUMMARY_FILE).is_file():
            raise PipelineError(f"{directory}: no {TRAIN_SUMMARY_FILE}")
    elif name == "export":
        from deploy.artifact import ArtifactError, verify_checksums

        try:
            verify_checksums(directory)
        except ArtifactError as exc:
            raise PipelineError(str(exc)) from exc


def stage_runners(config: Config, run_dir: Path, verbose: bool, sink: RecordSink) -> dict[str, Callable[[bool], None]]:
    """Each stage as a callable taking `resume` (only training uses it)."""
    d = {name: run_dir / spec.directory for name, spec in STAGE_SPECS.items()}
    parquet = sink.data_location(d["ingest"])

    def ingest(resume: bool) -> None:
        from pipeline.ingest import ingest as run_ingest

        run_ingest(config, d["ingest"], force=True)

    def train(resume: bool) -> None:
        from pipeline.train import train as run_train

        run_train(config, d["ingest"], d["train"], resume=resume, verbose=verbose, parquet=parquet)

    def evaluate(resume: bool) -> None:
        from pipeline.evaluate import evaluate as run_evaluate

        run_evaluate(config, d["ingest"], d["train"], d["evaluate"], verbose=verbose, parquet=parquet)

    def export(resume: bool) -> None:
        from pipeline.export import export as run_export

        run_export(config, d["train"], d["export"], data_dir=d["ingest"], eval_dir=d["evaluate"])

    return {"ingest": ingest, "train": train, "evaluate": evaluate, "export": export}


def can_resume_training(run_dir: Path, entry: dict[str, Any], key: str) -> bool:
    """An interrupted train stage with the same inputs and a checkpoint continues."""
    from pipeline.train import find_latest_checkpoint, storage_location

    if entry.get("key") != key or entry.get("status") == "complete":
        return False
    config = Config.from_dict(entry["config"]) if "config" in entry else None
    storage = storage_location(config or Config(), run_dir / "train")
    return find_latest_checkpoint(storage) is not None


def run_pipeline(
    config: Config,
    runs_root: Path | str = Path("runs"),
    run_dir: Path | str | None = None,
    force: str | None = None,
    verbose: bool = False,
) -> RunResult:
    """Run every stage in order, skipping cached ones; raises PipelineError on failure.
    A `runs_root` or `run_dir` that is an object-store URI runs through pipeline.remote_run."""
    if force is not None and force not in STAGES:
        raise PipelineError(f"--force: unknown stage {force!r}; choose one of {', '.join(STAGES)}")
    if is_uri(run_dir or "") or (run_dir is None and is_uri(runs_root)):
        from pipeline.remote_run import run_remote

        return run_remote(config, str(runs_root), None if run_dir is None else str(run_dir), force, verbose)
    runs_root = Path(runs_root)
    run_dir = choose_run_dir(runs_root, None if run_dir is None else Path(run_dir))
    check_run_dir(run_dir)
    in_runs_root = run_dir.parent.resolve() == runs_root.resolve()
    if in_runs_root:
        check_latest(runs_root)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{run_dir}: cannot create ({exc.strerror or exc})") from exc
    if in_runs_root:
        point_latest(runs_root, run_dir)
    log.info("run: %s", run_dir)
    return run_stages(config, run_dir, force, verbose)


class RecordSink:
    """Where run.json and finished stage outputs go besides the run directory: nowhere
    for a local run; pipeline.remote_run's object-store copy for a remote one."""

    location: str | None = None  # what the record and the user see as the run's place

    def record(self, record: dict[str, Any]) -> None:
        """run.json was rewritten."""

    def stage(self, name: str, directory: Path) -> None:
        """A stage finished writing `directory`; called before run.json says it is complete."""

    def data_location(self, data_dir: Path) -> str | None:
        """Where Ray Data should read the dataset (None: the local directory)."""
        return None


def save(run_dir: Path, record: dict[str, Any], sink: RecordSink) -> None:
    write_json(run_dir / RUN_FILE, record)
    sink.record(record)


def run_stages(
    config: Config, run_dir: Path, force: str | None, verbose: bool, sink: RecordSink | None = None
) -> RunResult:
    """The stages in `run_dir`, which exists and may hold an earlier run.json."""
    sink = sink or RecordSink()
    location = sink.location or str(run_dir)
    record = load_record(run_dir, config)
    record.setdefault("started", time.time())
    save(run_dir, record, sink)
    forced = STAGES[STAGES.index(force):] if force else ()
    runners = stage_runners(config, run_dir, verbose, sink)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for name in STAGES:
            key = stage_key(name, config, record)
            if name not in forced and is_cached(run_dir, record, name, key):
                log.info("run: %s: up to date, skipped", name)
                record["stages"][name]["skipped"] = True
                continue
            entry = record["stages"].get(name, {})
            resume = name == "train" and name not in forced and can_resume_training(run_dir, entry, key)
            execute_stage(run_dir, record, name, key, runners[name], resume, config, sink, location)
        record["status"] = "complete"
    except BaseException as exc:
        record["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        record["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        record["ended"] = time.time()
        record.pop("pid", None)
        # A failed final write must not hide the error that ended the run.
        with contextlib.suppress(PipelineError) if record["status"] != "complete" else contextlib.nullcontext():
            save(run_dir, record, sink)
    record["artifact"] = join(location, STAGE_SPECS["export"].directory)
    save(run_dir, record, sink)
    return RunResult(None if sink.location else run_dir, record, location)


def execute_stage(run_dir, record, name, key, runner, resume, config, sink, location) -> None:
    spec = STAGE_SPECS[name]
    started = time.time()
    entry = {
        "status": "running",
        "key": key,
        "started": started,
        "output": join(location, spec.directory),
        "inputs": {up: record["stages"][up]["output_sha256"] for up in UPSTREAM[name]},
        "config": config.to_dict(),
    }
    previous_output = record["stages"].get(name, {}).get("output_sha256")
    record["stages"][name] = entry
    save(run_dir, record, sink)
    log.info("run: %s: %s", name, "resuming from its latest checkpoint" if resume else "running")
    try:
        runner(resume)
        output = output_sha256(run_dir, name)
        # Uploaded (for a remote run) before run.json may say complete: an upload cut
        # off leaves the stage "running", never complete.
        sink.stage(name, run_dir / spec.directory)
    except BaseException as exc:
        entry.update(status="failed", ended=time.time(), error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        with contextlib.suppress(PipelineError):
            save(run_dir, record, sink)
        raise
    entry.update(status="complete", ended=time.time(), seconds=time.time() - started)
    entry["output_sha256"] = output
    if entry["output_sha256"] != previous_output:
        # Later stages were made from another output: stale. (Their keys would say so
        # too; dropping them keeps run.json honest.) An identical output, such as a
        # damaged dataset rebuilt from the same source, keeps them.
        for later in STAGES[STAGES.index(name) + 1 :]:
            record["stages"].pop(later, None)
    save(run_dir, record, sink)
    log.info("run: %s: done in %.0f s", name, entry["seconds"])


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
