"""Connecting to Ray: a local Ray sized to the machine, or an existing cluster.

An unreachable cluster address fails within seconds with one line, instead of
Ray's own long retry loop.
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


def host_port(address: str, default_port: int) -> tuple[str, int]:
    """Split `host:port`, `ray://host:port` or `http://host:port` into its parts."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname:
        raise PipelineError(f"cannot parse Ray address {address!r}")
    try:
        port = parsed.port or default_port
    except ValueError as exc:
        raise PipelineError(f"cannot parse Ray address {address!r}: {exc}") from exc
    return parsed.hostname, port


def check_reachable(address: str, default_port: int = 6379, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise PipelineError unless a TCP connection to `address` opens within `timeout`."""
    host, port = host_port(address, default_port)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PipelineError(f"cannot reach Ray cluster at {address}: {reason}") from exc


def connect(address: str | None, min_cpus: int, verbose: bool = False) -> None:
    """Start or join Ray. Without an address: a local Ray with at least `min_cpus`
    logical CPUs (so Ray Data has one left beside the training workers)."""
    import ray

    if address and address != "auto":
        check_reachable(address, default_port=10001 if address.startswith("ray://") else 6379)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0" if verbose else "1")
    if not verbose:
        quiet_ray_loggers()
    ray_level = logging.INFO if verbose else logging.WARNING
    runtime_env = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}}
    if address:
        # No runtime_env here: inside a Ray Job the job's own applies, and two conflict.
        log.info("ray: joining cluster at %s", address)
        ray.init(address=address, log_to_driver=verbose, logging_level=ray_level)
    else:
        cpus = max(os.cpu_count() or 1, min_cpus)
        log.info("ray: starting a local Ray with %d CPUs", cpus)
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=verbose,
            logging_level=ray_level,
            runtime_env=runtime_env,
        )
    import ray.data  # noqa: F401  (it configures its loggers on import: quiet them after)

    if not verbose:
        quiet_ray_loggers()


# Start-up and per-dataset lines that say nothing a pipeline user acts on: Ray's
# INFO chatter, the notice that a local Ray uses token authentication (it does, by
# default), and Ray Data's "progress bars disabled" (the stages print their own).
QUIET_LOGGERS = {
    "ray": logging.WARNING,
    "ray.data": logging.WARNING,
    "ray.train": logging.WARNING,
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "ray.data._internal.progress": logging.ERROR,
}


def quiet_ray_loggers() -> None:
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
