"""File helpers: text and JSON read and written through a temporary path and a rename,
so no reader ever sees a half-written output, and the files below a directory.

A write that fails for a reason outside the program (no space, no permission, a
read-only file system) raises PipelineError naming the path; nothing half-written is
left under the target name. Which stage may write where is pipeline.outputs' business.
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

from pipeline.errors import PipelineError


@contextlib.contextmanager
def atomic_directory(target: Path, before_swap: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success swap it in.

    `before_swap(tmp)` runs once the block has finished, before the swap (a stage adds its
    marker and checks its target again there). On any exception the temporary directory
    is removed and `target` is left exactly as it was. On success an existing `target` is
    first renamed aside, so at no moment is a partial directory visible under its name.
    """
    target = Path(target)
    _remove_stale_temporaries(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs are not
    except OSError as exc:
        raise PipelineError(f"{target.parent}: cannot write output here ({exc.strerror or exc})") from exc
    try:
        yield tmp
        if before_swap is not None:
            before_swap(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, target: Path) -> None:
    old = None
    try:
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
    except OSError as exc:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)  # put the previous output back
        raise PipelineError(f"{target}: cannot replace ({exc.strerror or exc})") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temporaries(target: Path) -> None:
    """Remove `.NAME.tmp-PID-*` directories beside `target` left by processes that are
    gone (killed mid-write): they were written by this helper and nothing else."""
    prefix = f".{target.name}.tmp-"
    try:
        candidates = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for path in candidates:
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise PipelineError(f"{path}: cannot write ({exc.strerror or exc})") from exc
        raise


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    """The JSON value in `path`; PipelineError naming the path if it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable JSON ({str(exc).splitlines()[0]})") from exc


def files_below(directory: Path) -> list[str]:
    """Every non-directory path under `directory`, relative, with "/" separators."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        base = Path(root).relative_to(directory)
        # A symbolic link to a directory is listed, not followed: it is a path like a file.
        links = [d for d in dirs if (Path(root) / d).is_symlink()]
        found += [(base / name).as_posix() for name in sorted(files + links)]
    return found
