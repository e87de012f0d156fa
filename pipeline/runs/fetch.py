"""`vae-pipeline fetch RUN --out DIR`: a finished run's artifact, copied and verified.

RUN is a run directory or URI, or RUNS/champion or RUNS/latest. The run must record its export stage
complete; the copy must match every checksum in its SHA256SUMS, and that file must be
the one run.json recorded. DIR must be new, empty or an earlier fetched artifact; it is
written through a temporary directory, so a cut-off copy never appears there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from deploy.artifact import ArtifactError, sha256_file, verify_checksums
from pipeline.errors import PipelineError
from pipeline.outputs import stage_output
from pipeline.runs.loop import is_run_record
from pipeline.runs.pointers import resolve_run
from pipeline.schema import CHECKSUMS_FILE, RUN_FILE, RUN_FORMAT
from pipeline.stages import stage
from pipeline.storage import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchResult:
    run: str
    out: Path
    files: dict[str, str]  # verified name -> SHA-256


def fetch(run: str, out: Path) -> FetchResult:
    location = resolve_run(str(run))
    store = Store.open(location)
    record = store.read_json(RUN_FILE)
    if not is_run_record(record):
        raise PipelineError(f"{location}: not a run of this pipeline (no {RUN_FILE} of format {RUN_FORMAT})")
    entry = record.get("stages", {}).get("export", {})
    if entry.get("status") != "complete":
        raise PipelineError(
            f"{location}: its export stage is not complete "
            f"(run status: {record.get('status', 'unknown')}); nothing to fetch"
        )
    relative = stage("export").directory
    with stage_output(Path(out), "export") as tmp:
        names = store.download(relative, tmp)
        if not names:
            raise PipelineError(f"{store.uri(relative)}: empty; the run's artifact is gone")
        try:
            files = verify_checksums(tmp)
        except ArtifactError as exc:
            raise PipelineError(str(exc).replace(str(tmp), store.uri(relative))) from exc
        if sha256_file(tmp / CHECKSUMS_FILE) != entry.get("output_sha256"):
            raise PipelineError(
                f"{store.uri(relative)}: {CHECKSUMS_FILE} is not the one {RUN_FILE} recorded (replaced?)"
            )
    log.info("fetch: %d files from %s", len(names), store.uri(relative))
    return FetchResult(location, Path(out), files)
