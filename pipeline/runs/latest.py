"""RUNS/latest, the pointer at the newest run: a symbolic link on disk, an object in a store.

An object store has no symbolic links, so there `latest` is a small JSON object naming
the run. Either is replaced atomically, and only when this pipeline wrote it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.schema import LATEST, LATEST_FORMAT
from pipeline.storage import Store, parent_and_name


def check_latest_link(runs_root: Path) -> None:
    """RUNS/latest may be absent or a symbolic link; anything else is not ours to replace."""
    link = Path(runs_root) / LATEST
    if os.path.lexists(link) and not link.is_symlink():
        raise PipelineError(f"{link}: exists and is not a symbolic link; refusing to replace it")


def point_latest_link(runs_root: Path, run_dir: Path) -> None:
    """Atomically repoint RUNS/latest at `run_dir` (a relative symlink)."""
    link = Path(runs_root) / LATEST
    tmp = link.with_name(f".{LATEST}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(run_dir.resolve(), link.parent.resolve()), tmp)
    os.replace(tmp, link)


def check_latest_object(root: Store) -> None:
    data = root.read_bytes(LATEST)
    if data is not None and read_latest(data) is None:
        raise PipelineError(f"{root.uri(LATEST)}: exists and was not written by vae-pipeline; refusing to replace it")


def point_latest_object(root: Store, run_location: str) -> None:
    root.write_json(LATEST, {"format": LATEST_FORMAT, "run": parent_and_name(run_location)[1]})


def read_latest(data: bytes) -> str | None:
    """The run name a `latest` object of this pipeline holds, else None."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    ok = isinstance(value, dict) and value.get("format") == LATEST_FORMAT and isinstance(value.get("run"), str)
    return value["run"] if ok and "/" not in value["run"] else None


def resolve_run(location: str) -> str:
    """A run location, with a trailing `latest` (an object in a store, a symbolic link on
    disk) replaced by the run it names."""
    parent, name = parent_and_name(location)
    if name != LATEST:
        return location
    root = Store.open(parent)
    if not root.is_remote:
        return str(Path(root.path(LATEST)).resolve())
    run = read_latest(root.read_bytes(LATEST) or b"")
    if run is None:
        raise PipelineError(f"{location}: no run is recorded there")
    return root.uri(run)
