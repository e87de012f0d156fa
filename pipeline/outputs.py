"""Which paths a stage may write: a new path, an empty directory, or its own earlier output.

Every stage output directory holds a marker file (`schema.OUTPUT_MARKER`) naming the
stage that wrote it and every path it owns there. A stage replaces, or for training adds
to, only a directory whose marker names the same stage and which holds nothing else.
Anything else at the output path (a file, a directory of other files, another stage's
output, a file dropped into an earlier output) is refused with one line naming the
path, and left exactly as it was. The check runs before a stage spends any time, and
again just before a finished output is swapped in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.errors import PipelineError
from pipeline.files import atomic_directory, files_below, write_json
from pipeline.schema import OUTPUT_FORMAT, OUTPUT_MARKER

MAX_LISTED = 3  # foreign paths named in a refusal


def resolve_target(target: Path) -> Path:
    """The path a stage writes: a symbolic link's destination, or `target` itself."""
    target = Path(target)
    return Path(os.path.realpath(target)) if target.is_symlink() else target


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker of an output directory, or None when it has none (or an unreadable one)."""
    path = Path(directory) / OUTPUT_MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != OUTPUT_FORMAT:
        return None
    return marker


def write_marker(directory: Path, stage: str, owned: list[str]) -> None:
    """Record that `stage` wrote `directory` and owns the relative paths `owned` in it
    (a directory in `owned` covers everything below it)."""
    marker = {
        "format": OUTPUT_FORMAT,
        "stage": stage,
        "written_by": f"vae-pipeline {__version__}",
        "owned": sorted(set(owned)),
    }
    write_json(Path(directory) / OUTPUT_MARKER, marker)


def is_owned(relative: str, owned: set[str]) -> bool:
    """Whether `relative` is an owned path, lies below one, or is a leftover of writing
    an owned top-level name through a temporary path (`.NAME.tmp-*`, or `.NAME.` and mkstemp's random suffix)."""
    parts = relative.split("/")
    if any("/".join(parts[:depth]) in owned for depth in range(1, len(parts) + 1)):
        return True
    top = parts[0]
    return top.startswith(".") and any(top[1:].startswith(name + ".") for name in owned)


def foreign_paths(directory: Path, marker: dict[str, Any]) -> list[str]:
    """Paths under `directory` that its marker does not claim."""
    owned = {*marker.get("owned", []), OUTPUT_MARKER}
    return [path for path in files_below(directory) if not is_owned(path, owned)]


def check_output(target: Path, stage: str) -> bool:
    """Raise PipelineError unless `stage` may write `target`; True when `target` already
    holds that stage's own earlier output, False when it is new or an empty directory.

    Also makes sure the parent directory exists and is writable, so that a stage fails
    here, before its work, rather than after it.
    """
    target = resolve_target(target)
    existing = False
    if target.exists() or target.is_symlink():
        existing = _check_existing(target, stage)
    _check_writable(target.parent)
    return existing


def _check_existing(target: Path, stage: str) -> bool:
    if not target.is_dir():
        raise PipelineError(f"{target}: exists and is not a directory; refusing to replace it")
    try:
        empty = not any(target.iterdir())
    except OSError as exc:
        raise PipelineError(f"{target}: cannot read ({exc.strerror})") from exc
    if empty:
        return False
    marker = read_marker(target)
    if marker is None:
        raise PipelineError(
            f"{target}: exists and was not written by vae-pipeline (no {OUTPUT_MARKER}); "
            "refusing to touch it: choose another output path, or move its contents away"
        )
    if marker.get("stage") != stage:
        raise PipelineError(
            f"{target}: holds the output of the {marker.get('stage')} stage, not {stage}; refusing to replace it"
        )
    foreign = foreign_paths(target, marker)
    if foreign:
        more = f" and {len(foreign) - MAX_LISTED} more" if len(foreign) > MAX_LISTED else ""
        raise PipelineError(
            f"{target}: holds files the {stage} stage did not write "
            f"({', '.join(foreign[:MAX_LISTED])}{more}); refusing to replace it: move them away first"
        )
    return True


def _check_writable(parent: Path) -> None:
    blocking = next((p for p in [parent, *parent.parents] if p.exists() or p.is_symlink()), None)
    if blocking is not None and not blocking.is_dir():
        raise PipelineError(f"{blocking}: is not a directory, so nothing can be written below it")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=".vae-pipeline-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise PipelineError(f"{parent}: cannot write output here ({exc.strerror or exc})") from exc


@contextlib.contextmanager
def claimed_output(target: Path, stage: str, owned: list[str], keep_on_failure: Callable[[], bool]) -> Iterator[Path]:
    """For a stage that writes in place (training): check `target`, create it, and write
    its marker before anything else, so that an interrupted run is still recognised as
    the stage's own; yields the directory written.

    When the block fails with a PipelineError (the stage's own, reported failure) and
    `target` did not hold this stage's output before, what the stage wrote there (its
    `owned` names and the marker) is removed again, and `target` itself if this call
    created it, unless `keep_on_failure()` says there is something to continue from
    (training's checkpoints, for `--resume`). The stage's own earlier output is left."""
    earlier = check_output(target, stage)
    target = resolve_target(target)
    created = not target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{target}: cannot create ({exc.strerror or exc})") from exc
    write_marker(target, stage, owned)
    try:
        yield target
    except PipelineError:
        if not earlier and not keep_on_failure():
            _remove_owned(target, {*owned, OUTPUT_MARKER}, created)
        raise


def _remove_owned(directory: Path, owned: set[str], created: bool) -> None:
    for child in directory.iterdir():
        if is_owned(child.name, owned):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
            directory.rmdir()


@contextlib.contextmanager
def stage_output(target: Path, stage: str) -> Iterator[Path]:
    """`files.atomic_directory` for a stage's output: `target` must be new, empty, or that
    stage's own earlier output with nothing else in it, checked before the block runs and
    again before the swap; the finished directory gets the stage's marker listing every
    file in it. On any failure `target` is left exactly as it was."""
    check_output(target, stage)

    def finish(tmp: Path) -> None:
        write_marker(tmp, stage, files_below(tmp))
        check_output(target, stage)

    with atomic_directory(resolve_target(Path(target)), before_swap=finish) as tmp:
        yield tmp
