"""The four stages, in the order data flows through them, each one record of `STAGES`.

A stage module (`pipeline.stages.<name>`) holds the stage's own function, which the
command line calls, and two functions the run loop (pipeline.runs.loop) calls:
`run_in(run: StageRun)`, which runs the stage inside a run directory, and
`check_done(directory)`, which raises PipelineError unless a completed output is still
fit to be reused. Stages hand each other directories, never each other's internals:
no stage module imports another.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.config import Config
from pipeline.schema import (
    CHECKSUMS_FILE,
    MANIFEST_FILE,
    MODEL_DIR,
    MODEL_FILE,
    RAY_STORAGE_DIR,
    REPORT_JSON,
)


@dataclass(frozen=True)
class Stage:
    name: str
    directory: str  # its output directory inside a run
    sections: tuple[str, ...]  # the config sections that are its inputs
    upstream: tuple[str, ...]  # the stages whose outputs it reads
    output_file: str  # the file whose hash stands for its whole output
    # What a run in an object store keeps only there, never in its staging copy.
    kept_in_store: tuple[str, ...] = ()

    def module(self) -> ModuleType:
        """`pipeline.stages.<name>`, imported on first use (it may import TensorFlow)."""
        return importlib.import_module(f"{__name__}.{self.name}")


STAGES = (
    Stage("ingest", "data", ("data",), (), MANIFEST_FILE),
    Stage("train", "train", ("seed", "model", "train"), ("ingest",), f"{MODEL_DIR}/{MODEL_FILE}", (RAY_STORAGE_DIR,)),
    Stage("evaluate", "eval", ("seed", "evaluate"), ("ingest", "train"), REPORT_JSON),
    Stage("export", "artifact", ("seed", "export"), ("ingest", "train", "evaluate"), CHECKSUMS_FILE),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
_BY_NAME = {stage.name: stage for stage in STAGES}


def stage(name: str) -> Stage:
    """The stage called `name`; KeyError for any other name."""
    return _BY_NAME[name]


def stages_from(name: str | None) -> tuple[str, ...]:
    """`name` and every stage after it; none for None."""
    return STAGE_NAMES[STAGE_NAMES.index(name) :] if name else ()


@dataclass(frozen=True)
class StageRun:
    """What the run loop hands a stage: the config, the run directory (every stage's
    output is `directory(name)` in it), and how to run."""

    config: Config
    run_dir: Path
    resume: bool = False  # continue from the latest checkpoint (training alone uses it)
    verbose: bool = False
    parquet: str | None = None  # where Ray Data reads the dataset; None: the data directory
    on_epoch: Callable[[dict[str, Any]], None] | None = None  # each epoch's metrics, at the driver

    def directory(self, name: str) -> Path:
        return self.run_dir / stage(name).directory
