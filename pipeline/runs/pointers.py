"""RUNS/latest and RUNS/champion: the two names apps and schedulers follow.

- `latest`: the newest run (by start time) that completed every stage. A run in progress
  is never named; it is found and resumed by its own location.
- `champion`: the run whose model apps should use, the newest one that passed the gate
  (pipeline.runs.gate) or was promoted by hand (`vae-pipeline promote`).

On disk a pointer is a relative symbolic link to the run directory; in an object store,
which has no links, a small JSON object naming the run. Either is replaced atomically and
only when this pipeline wrote it. Every change is a read-decide-write under a lock, so
two runs finishing at once cannot both act on the same old value:

- a directory: an exclusive `flock` on RUNS/.pointers.lock;
- `s3://`: the store's conditional write (`If-Match` on the pointer's ETag, or
  `If-None-Match: *` when it is absent); a write that loses the race decides again;
- any other store: a plain write (no conditional write there); one warning says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.schema import CHAMPION, LATEST, LATEST_FORMAT
from pipeline.storage import Store, is_uri, parent_and_name, with_retries

log = logging.getLogger(__name__)

POINTERS = (LATEST, CHAMPION)
LOCK_FILE = ".pointers.lock"
# A decision: given the run a pointer names now (None: none), the run it should name
# (None: leave it as it is).
Decide = Callable[[str | None], str | None]


def pointer_value(run: str) -> dict[str, Any]:
    return {"format": LATEST_FORMAT, "run": run, "updated": time.time()}


def read_pointer_object(data: bytes) -> str | None:
    """The run name a pointer object of this pipeline holds, else None."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    ok = isinstance(value, dict) and value.get("format") == LATEST_FORMAT and isinstance(value.get("run"), str)
    return value["run"] if ok and "/" not in value["run"] else None


class Pointers:
    """The pointers of one runs root (a directory or an object-store URI)."""

    def __init__(self, runs_root: str | os.PathLike):
        self.root = Store.open(runs_root)

    def uri(self, name: str) -> str:
        return self.root.uri(name)

    def check(self) -> None:
        """Each pointer is absent or this pipeline's: PipelineError before anything runs."""
        for name in POINTERS:
            if self.root.is_remote:
                data = self.root.read_bytes(name)
                if data is not None and read_pointer_object(data) is None:
                    raise PipelineError(
                        f"{self.uri(name)}: exists and was not written by vae-pipeline; refusing to replace it"
                    )
            else:
                link = Path(self.root.path(name))
                if os.path.lexists(link) and not link.is_symlink():
                    raise PipelineError(f"{link}: exists and is not a symbolic link; refusing to replace it")

    def read(self, name: str) -> str | None:
        """The run name `name` points at, or None."""
        if self.root.is_remote:
            data = self.root.read_bytes(name)
            return None if data is None else read_pointer_object(data)
        link = Path(self.root.path(name))
        if not link.is_symlink():
            return None
        return Path(os.readlink(link)).name

    def update(self, name: str, decide: Decide) -> str | None:
        """Read `name`, let `decide` choose, write its choice; all as one step against every
        other update. Returns the run `name` points at afterwards."""
        self.check()
        if not self.root.is_remote:
            with self._lock():
                current = self.read(name)
                chosen = decide(current)
                if chosen is not None and chosen != current:
                    self._write_link(name, chosen)
                    return chosen
                return current
        if self.root.uri().startswith("s3://"):
            return _S3Pointer(self.uri(name)).update(decide)
        log.warning("%s: this store has no conditional write here; promotions are not serialised", self.uri(name))
        current = self.read(name)
        chosen = decide(current)
        if chosen is not None and chosen != current:
            self.root.write_json(name, pointer_value(chosen))
            return chosen
        return current

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        path = Path(self.root.path(LOCK_FILE))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write_link(self, name: str, run: str) -> None:
        link = Path(self.root.path(name))
        tmp = link.with_name(f".{name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        os.symlink(run, tmp)
        os.replace(tmp, link)


class _S3Pointer:
    """One pointer object in S3, changed only by a conditional write."""

    def __init__(self, uri: str):
        import boto3

        bucket_and_key = uri.removeprefix("s3://").split("?")[0]
        self.uri = uri
        self.bucket, _, self.key = bucket_and_key.partition("/")
        self.client = boto3.client("s3")

    def _get(self) -> tuple[str | None, str | None]:
        """(run, ETag) of the object now; (None, None) when there is none."""
        try:
            with _as_os_error():
                response = self.client.get_object(Bucket=self.bucket, Key=self.key)
                return read_pointer_object(response["Body"].read()), response["ETag"]
        except FileNotFoundError:
            return None, None

    def _put(self, run: str, etag: str | None) -> bool:
        """Write if the object is still the one read; False when another write came first."""
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        body = json.dumps(pointer_value(run)).encode()
        try:
            with _as_os_error():
                self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)
        except _Conflict:
            return False
        return True

    def update(self, decide: Decide) -> str | None:
        while True:
            current, etag = with_retries(self._get, f"{self.uri}: cannot read")
            chosen = decide(current)
            if chosen is None or chosen == current:
                return current
            if with_retries(functools.partial(self._put, chosen, etag), f"{self.uri}: cannot write"):
                return chosen
            log.info("%s: changed while deciding; deciding again", self.uri)


class _Conflict(Exception):
    """A conditional write found the object changed since it was read."""


@contextlib.contextmanager
def _as_os_error() -> Iterator[None]:
    """boto3's errors in the words pipeline.storage.with_retries knows: an unreachable or
    failing (5xx) store is a transient OSError, a missing object FileNotFoundError, a lost
    conditional write _Conflict, anything else a PipelineError-bound OSError."""
    import botocore.exceptions

    try:
        yield
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        code, status = error.get("Code", ""), exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey", "404"):
            raise FileNotFoundError(code) from exc
        if code in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise _Conflict(code) from exc
        prefix = "Service Unavailable: " if status >= 500 else ""
        raise OSError(f"{prefix}AWS Error {code}: {error.get('Message', '')}") from exc
    except botocore.exceptions.BotoCoreError as exc:  # no connection, timeouts
        raise OSError(f"Could not connect: {exc}") from exc


def resolve_run(location: str) -> str:
    """A run location, with a trailing `latest` or `champion` replaced by the run it names."""
    parent, name = parent_and_name(location)
    if name not in POINTERS:
        return location
    if not is_uri(location):
        link = Path(location)
        if not link.is_symlink():
            raise PipelineError(f"{location}: no run is recorded there")
        return str(link.resolve())
    pointers = Pointers(parent)
    run = pointers.read(name)
    if run is None:
        raise PipelineError(f"{location}: no run is recorded there")
    return pointers.root.uri(run)
