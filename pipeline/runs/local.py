"""A run in a directory on this machine: RUNS/run-YYYYmmdd-HHMMSS.

RUN must be new, empty or a run directory. (RUNS/latest and RUNS/champion, symbolic
links, move after the run: pipeline.runs.promotion.)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.files import read_json
from pipeline.runs.loop import RunObserver, RunResult, is_run_record, run_stages
from pipeline.schema import RUN_FILE, RUN_FORMAT

log = logging.getLogger(__name__)


def choose_run_dir(runs_root: Path, run_dir: Path | None) -> Path:
    """The given run directory, else a new timestamped one under `runs_root`."""
    if run_dir is not None:
        return Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = Path(runs_root) / f"run-{stamp}", 1
    while candidate.exists():
        candidate, n = Path(runs_root) / f"run-{stamp}-{n}", n + 1
    return candidate


def check_run_dir(run_dir: Path) -> None:
    """A run directory must be new, empty, or hold a run.json this pipeline wrote."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise PipelineError(f"{run_dir}: exists and is not a directory")
    if not any(run_dir.iterdir()):
        return
    try:
        record = read_json(run_dir / RUN_FILE)
    except PipelineError:
        record = None
    if not is_run_record(record):
        raise PipelineError(
            f"{run_dir}: not a run directory of this pipeline (no {RUN_FILE} of format {RUN_FORMAT}); "
            "refusing to write into it"
        )


def run_local(config: Config, run_dir: Path, force: str | None, verbose: bool, observer: RunObserver) -> RunResult:
    """`run_pipeline` for a run directory on this machine."""
    check_run_dir(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{run_dir}: cannot create ({exc.strerror or exc})") from exc
    log.info("run: %s", run_dir)
    return run_stages(config, run_dir, force, verbose, observer=observer)
