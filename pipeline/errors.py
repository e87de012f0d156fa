"""The project's user-facing error type, and finding it inside Ray's wrappers."""

from __future__ import annotations

import re

# How a PipelineError appears in a remote traceback's text.
_REMOTE_LINE = re.compile(r"^pipeline\.errors\.PipelineError: (.+)$", re.MULTILINE)


class PipelineError(Exception):
    """A problem the user can fix (bad input, bad config, unreachable cluster).

    The CLI prints its message on one line, without a traceback, and exits with
    `exit_code` (2). Bugs raise anything else and keep their traceback.
    """

    exit_code = 2


class GateRejected(PipelineError):
    """A run completed, but its model did not pass the gate (pipeline.runs.gate): kept for
    inspection, not promoted. Its own exit code, so that a scheduler can tell it from bad
    input (2) and from a crash (1)."""

    exit_code = 3


def find_user_error(error: BaseException) -> PipelineError | None:
    """The PipelineError behind `error`, if any, however Ray wrapped it.

    An error raised in a Ray task, actor or Ray Train worker comes back wrapped: a
    RayTaskError holding it as `cause`, a Ray Train WorkerGroupError holding each
    worker's error in `worker_failures`, a ControllerError's `controller_failure`, or
    a plain exception chain. Returns the original PipelineError (not Ray's copy,
    whose message carries the remote traceback), or None.

    Ray pickles exceptions, and pickling drops `__cause__`: a PipelineError that Ray
    Data wrapped in its UserCodeException survives only as a line of the remote
    traceback, from which it is rebuilt as a last resort.
    """
    found = _find_object(error)
    if found is not None:
        return found
    match = _REMOTE_LINE.search(_chain_text(error))
    return PipelineError(match.group(1).strip()) if match else None


def _chain_text(error: BaseException) -> str:
    texts, current, seen = [], error, set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts.append(str(current))
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return "\n".join(texts)


def _find_object(error: BaseException) -> PipelineError | None:
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(cause, BaseException):  # Ray's RayTaskError: look at the original
            pending.insert(0, cause)
            continue
        if isinstance(current, PipelineError):
            return current
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            pending.extend(failures.values())
        pending.extend([getattr(current, "controller_failure", None), current.__cause__, current.__context__])
    return None


def last_line(error: BaseException) -> str:
    """The last non-empty line of an error's message (where Ray puts the cause), or its type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
