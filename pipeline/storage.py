"""Where runs live: a local directory or an object-store URI (`s3://`, `gs://`), one
interface over both through `pyarrow.fs`.

An object store has no rename and no partial objects: an object is either written whole
or absent. What makes a directory of objects "complete" is a later write that says so
(for runs, run.json; see pipeline.runs.remote). Transient failures (the store unreachable,
throttled, or failing with a 5xx) are retried for up to `VAE_PIPELINE_STORAGE_RETRY_S`
seconds (default 60); anything else, or an outage longer than that, is one PipelineError
line naming the location.

Credentials and endpoints come from the environment, as every AWS/GCS tool reads them
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`,
`GOOGLE_APPLICATION_CREDENTIALS`, ...).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import PipelineError
from pipeline.files import files_below, write_text

log = logging.getLogger(__name__)

RETRY_ENV = "VAE_PIPELINE_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 60.0
# pyarrow reports an unreachable or overloaded store in these words (AWS SDK error names
# and curl's); anything else (no such bucket, access denied) will not heal by waiting.
TRANSIENT = (
    "NETWORK_CONNECTION",
    "curlCode",
    "Could not connect",
    "Connection refused",
    "timed out",
    "Timeout",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "INTERNAL_FAILURE",
    "Service Unavailable",
    "Internal Server Error",
    "HTTP response code: 5",
)
CHUNK = 8 << 20

T = TypeVar("T")


def is_uri(location: str | os.PathLike) -> bool:
    """An object-store URI (`s3://...`, `gs://...`); a plain path or `file://` is local."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def join(location: str, *parts: str) -> str:
    """`location` and relative parts joined with "/" (for URIs and paths alike)."""
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts if p)])


def parent_and_name(location: str) -> tuple[str, str]:
    head, _, name = str(location).rstrip("/").rpartition("/")
    return head, name


def retry_budget() -> float:
    try:
        return float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))
    except ValueError as exc:
        raise PipelineError(f"{RETRY_ENV}={os.environ[RETRY_ENV]!r}: not a number of seconds") from exc


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and any(word in str(exc) for word in TRANSIENT)


def short(exc: BaseException) -> str:
    """The part of a pyarrow storage error that says what went wrong, on one line."""
    text = re.sub(r"\s*\(Request ID: [^)]*\)", "", " ".join(str(exc).split()))
    if "AWS Error" in text:  # "When <doing what> for key '...' in bucket '...': AWS Error ..."
        text = text[text.index("AWS Error") :]
    return text[:240] + ("..." if len(text) > 240 else "")


class _Outage:
    """When the store last stopped answering, shared by every operation of this process:
    an upload of many files, each retried, must not get the whole budget per file."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None

    def failed(self, attempt_started: float) -> float:
        """Seconds since the outage began: with the attempt that just failed, if it is the
        first to fail (a hung request counts from when it was sent)."""
        with self.lock:
            if self.since is None:
                self.since = attempt_started
            return time.monotonic() - self.since

    def ended(self) -> None:
        with self.lock:
            self.since = None


_OUTAGE = _Outage()


def with_retries(action: Callable[[], T], what: str, budget: float | None = None) -> T:
    """`action()`, retried with growing pauses while its failures are transient, until the
    outage (counted from the store's first failure, across operations) has lasted `budget`
    seconds; then one PipelineError line. One attempt may itself last a request timeout
    (`request_timeout_s`) beyond that."""
    budget = retry_budget() if budget is None else budget
    pause, warned = 0.5, False
    while True:
        attempt_started = time.monotonic()
        try:
            result = action()
        except OSError as exc:
            if not is_transient(exc):
                raise PipelineError(f"{what}: {short(exc)}") from exc
            elapsed = _OUTAGE.failed(attempt_started)
            if elapsed + pause > budget:
                _OUTAGE.ended()  # given up: the next operation starts its own count
                raise PipelineError(
                    f"{what}: storage unreachable for {elapsed:.0f} s ({short(exc)}); "
                    "nothing was recorded as complete, run again to continue"
                ) from exc
            if not warned:
                log.warning("storage: %s: %s; retrying for up to %.0f s", what, short(exc), budget - elapsed)
                warned = True
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
        else:
            _OUTAGE.ended()
            return result


def request_timeout_s(budget: float) -> float:
    """How long one request to the store may hang: a third of the retry budget, 2-30 s."""
    return min(30.0, max(2.0, budget / 3))


def bounded_s3(filesystem, timeout: float, attempts: int = 1):
    """The same S3 filesystem (endpoint, region, credentials as `from_uri` resolved them),
    each request bounded by `timeout` (an S3 URI cannot set one) and tried `attempts`
    times by the SDK (once where with_retries does the retrying)."""
    import pyarrow.fs as pafs

    settings = filesystem.__reduce__()[1][0]  # pyarrow's own pickling: every setting, by name
    settings.update(connect_timeout=timeout, request_timeout=timeout)
    return pafs.S3FileSystem(**settings, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))


def ray_train_storage(location: str) -> tuple[str, Any]:
    """Ray Train's `storage_path` and `storage_filesystem` for `location`. For `s3://`, the
    store's filesystem with each request bounded as `Store.open` bounds it (Ray Train's
    controller writes its own state there, and a hung store must not hold it for minutes),
    keeping the SDK's usual three tries, since nothing retries those writes; anything else
    is left for Ray Train to resolve."""
    if not str(location).startswith("s3://"):
        return str(location), None
    store = Store.open(location)
    return store.root, bounded_s3(store.filesystem, request_timeout_s(retry_budget()), attempts=3)


@dataclass(frozen=True)
class Store:
    """A directory, local or in an object store: relative paths under `location`."""

    location: str
    filesystem: Any  # pyarrow.fs.FileSystem
    root: str

    @classmethod
    def open(cls, location: str | os.PathLike) -> Store:
        import pyarrow.fs as pafs

        text = str(location)
        if not is_uri(text):
            path = Path(text.removeprefix("file://")).expanduser().absolute()
            return cls(str(path), pafs.LocalFileSystem(), str(path))
        try:
            filesystem, root = pafs.FileSystem.from_uri(text)
            if text.startswith("s3://"):
                # The same store, with a bound on each request: the SDK's own default lets
                # a server that accepts and never answers hold one call for minutes. Its own
                # retries are left to with_retries, which counts the outage.
                filesystem = bounded_s3(filesystem, request_timeout_s(retry_budget()))
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise PipelineError(f"{text}: cannot open this storage location ({short(exc)})") from exc
        return cls(text.rstrip("/"), filesystem, root.rstrip("/"))

    @property
    def is_remote(self) -> bool:
        return is_uri(self.location)

    def path(self, relative: str = "") -> str:
        return join(self.root, relative) if relative else self.root

    def uri(self, relative: str = "") -> str:
        return join(self.location, relative) if relative else self.location

    def child(self, relative: str) -> Store:
        return Store(self.uri(relative), self.filesystem, self.path(relative))

    def _retry(self, action: Callable[[], T], what: str, relative: str) -> T:
        return with_retries(action, f"{self.uri(relative)}: {what}")

    def read_bytes(self, relative: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        import pyarrow.fs as pafs

        def read() -> bytes | None:
            info = self.filesystem.get_file_info(self.path(relative))
            if info.type != pafs.FileType.File:
                return None
            with self.filesystem.open_input_stream(self.path(relative)) as stream:
                return stream.read()

        return self._retry(read, "cannot read", relative)

    def write_text(self, relative: str, text: str) -> None:
        """One object written whole (locally: a temporary file renamed into place)."""
        if not self.is_remote:
            write_text(Path(self.path(relative)), text)
            return

        def write() -> None:
            with self.filesystem.open_output_stream(self.path(relative)) as stream:
                stream.write(text.encode())

        self._retry(write, "cannot write", relative)

    def read_json(self, relative: str) -> Any:
        data = self.read_bytes(relative)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    def write_json(self, relative: str, value: Any) -> None:
        self.write_text(relative, json.dumps(value, indent=2) + "\n")

    def list_files(self, relative: str = "") -> list[str]:
        """Every file below `relative`, as paths relative to it, sorted."""
        import pyarrow.fs as pafs

        base = self.path(relative)

        def listing() -> list[str]:
            selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
            infos = self.filesystem.get_file_info(selector)
            return sorted(i.path[len(base) + 1 :] for i in infos if i.type == pafs.FileType.File)

        return self._retry(listing, "cannot list", relative)

    def list_directories(self) -> list[str]:
        """The names of the directories (prefixes, in a store) directly below this one, sorted."""
        import pyarrow.fs as pafs

        def listing() -> list[str]:
            selector = pafs.FileSelector(self.root, recursive=False, allow_not_found=True)
            infos = self.filesystem.get_file_info(selector)
            return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

        return self._retry(listing, "cannot list", "")

    def is_empty(self) -> bool:
        return not self.list_files()

    def upload(self, local_dir: Path, relative: str, skip: Iterable[str] = ()) -> list[str]:
        """Copy every file below `local_dir` to `relative/` (file by file, each retried);
        then delete the objects there that the copy does not have, except under `skip`.
        Returns the relative paths written."""

        skipped = tuple(s.rstrip("/") + "/" for s in skip)
        files = [f for f in files_below(Path(local_dir)) if not f.startswith(skipped)]
        for name in files:
            self._copy(Path(local_dir) / name, join(relative, name))
        written = set(files)
        stale = [f for f in self.list_files(relative) if f not in written and not f.startswith(skipped)]
        for name in stale:
            self._retry(
                lambda n=name: self.filesystem.delete_file(self.path(join(relative, n))),
                "cannot delete",
                join(relative, name),
            )
        return files

    def _copy(self, source: Path, relative: str) -> None:
        def copy() -> None:
            if not self.is_remote:
                Path(self.path(relative)).parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as src, self.filesystem.open_output_stream(self.path(relative)) as out:
                while chunk := src.read(CHUNK):
                    out.write(chunk)

        self._retry(copy, "cannot write", relative)

    def download(self, relative: str, local_dir: Path, skip: Iterable[str] = ()) -> list[str]:
        """Copy every file below `relative/` into `local_dir` (which it creates)."""
        skipped = tuple(s.rstrip("/") + "/" for s in skip)
        files = [f for f in self.list_files(relative) if not f.startswith(skipped)]
        for name in files:
            target = Path(local_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)

            def copy(name: str = name, target: Path = target) -> None:
                with (
                    self.filesystem.open_input_stream(self.path(join(relative, name))) as src,
                    open(target, "wb") as out,
                ):
                    while chunk := src.read(CHUNK):
                        out.write(chunk)

            self._retry(copy, "cannot read", join(relative, name))
        return files
