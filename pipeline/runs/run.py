"""`vae-pipeline run`: ingest -> train -> evaluate -> export in one run, cached per stage.

Where the run lives is chosen here, once: a directory on this machine
(pipeline.runs.local) or an object store (pipeline.runs.remote, when RUNS or RUN is an
`s3://` or `gs://` URI). Both then hand the stages to the one loop, pipeline.runs.loop.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.runs.loop import RunResult
from pipeline.stages import STAGE_NAMES
from pipeline.storage import is_uri


def run_pipeline(
    config: Config,
    runs_root: Path | str = Path("runs"),
    run_dir: Path | str | None = None,
    force: str | None = None,
    verbose: bool = False,
) -> RunResult:
    """Run every stage in order, skipping cached ones; raises PipelineError on failure."""
    if force is not None and force not in STAGE_NAMES:
        raise PipelineError(f"--force: unknown stage {force!r}; choose one of {', '.join(STAGE_NAMES)}")
    if is_uri(run_dir or "") or (run_dir is None and is_uri(runs_root)):
        from pipeline.runs.remote import run_remote

        return run_remote(config, str(runs_root), None if run_dir is None else str(run_dir), force, verbose)
    from pipeline.runs.local import run_local

    return run_local(config, Path(runs_root), None if run_dir is None else Path(run_dir), force, verbose)
