"""Which artifact a `--model` path names, now: an artifact directory, a run directory
(its `artifact/`), or a pointer such as `RUNS/champion` (a symbolic link the pipeline
moves when a run is promoted). `vae-generate serve` asks again every few seconds and
swaps in the new model when the answer changes (deploy.serve_process)."""

from __future__ import annotations

import os
from pathlib import Path

from deploy.artifact import CHECKSUMS_FILE, sha256_file

RUN_FILE = "run.json"  # what marks a run directory (the pipeline's schema names it too)
ARTIFACT_DIR = "artifact"


def resolve_artifact(model: str | os.PathLike) -> Path:
    """The artifact directory `model` names at this moment, with every link resolved."""
    path = Path(model).expanduser().resolve()
    if (path / RUN_FILE).is_file() and (path / ARTIFACT_DIR).is_dir():
        return path / ARTIFACT_DIR
    return path


def served_from(artifact_dir: Path) -> dict[str, str | None]:
    """What `/v1/model` says about where the model came from: the artifact, the run that
    made it (when it sits in a run directory) and its SHA256SUMS's own hash."""
    artifact_dir = Path(artifact_dir)
    run = artifact_dir.parent if (artifact_dir.parent / RUN_FILE).is_file() else None
    sums = artifact_dir / CHECKSUMS_FILE
    return {
        "artifact": str(artifact_dir),
        "run": None if run is None else run.name,
        "checksums_sha256": sha256_file(sums) if sums.is_file() else None,
    }
