"""`vae-pipeline run`: ingest -> train -> evaluate -> export in one run, cached per stage,
then the gate.

Where the run lives is chosen here, once: a directory on this machine
(pipeline.runs.local) or an object store (pipeline.runs.remote, when RUNS or RUN is an
`s3://` or `gs://` URI). Both hand the stages to the one loop, pipeline.runs.loop. When
every stage is complete, pipeline.runs.promotion moves `latest`, judges the run and, if
it passed, moves `champion`; an MLflow tracker (pipeline.runs.tracking) follows it all
when tracking is on.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.runs.loop import RunResult
from pipeline.runs.promotion import finish_run, pointers_for
from pipeline.runs.tracking import Tracker
from pipeline.stages import STAGE_NAMES
from pipeline.storage import is_uri


def run_pipeline(
    config: Config,
    runs_root: Path | str = Path("runs"),
    run_dir: Path | str | None = None,
    force: str | None = None,
    verbose: bool = False,
) -> RunResult:
    """Run every stage in order, skipping cached ones, then the gate. Raises PipelineError
    on failure, GateRejected (a PipelineError) when the run completed but failed the gate."""
    if force is not None and force not in STAGE_NAMES:
        raise PipelineError(f"--force: unknown stage {force!r}; choose one of {', '.join(STAGE_NAMES)}")
    remote = is_uri(run_dir or "") or (run_dir is None and is_uri(runs_root))
    if remote:
        from pipeline.runs.remote import new_run_location

        location = str(run_dir or new_run_location(str(runs_root))).rstrip("/")
    else:
        from pipeline.runs.local import choose_run_dir

        location = str(choose_run_dir(Path(runs_root), None if run_dir is None else Path(run_dir)))
    pointers = pointers_for(str(runs_root), location)
    if pointers is not None:
        pointers.check()  # before anything runs: a pointer that is not ours is refused
    tracker = Tracker(config)
    if remote:
        from pipeline.runs.remote import run_remote

        result = run_remote(config, location, force, verbose, tracker)
    else:
        from pipeline.runs.local import run_local

        result = run_local(config, Path(location), force, verbose, tracker)
    result.record["gate"] = finish_run(result.location, config, pointers, tracker)
    return result
