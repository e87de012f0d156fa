"""Connecting to Ray: a local Ray sized to the machine, or an existing cluster.

An address that is unreachable, or where something other than Ray answers, fails
within seconds with one line, instead of Ray's own long retry loop. A local Ray that
the CLI starts is stopped when the CLI ends, however it ends (see pipeline.cluster.reaper).
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.error
import urllib.request
from urllib.parse import urlparse

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 8.0
# One call a Ray server answers, for each kind of address: the GCS (host:6379) and the
# Ray Client server (ray://host:10001). The request is the empty (default) message.
PROBE_METHODS = {
    "gcs": "/ray.rpc.NodeInfoGcsService/GetClusterId",
    "client": "/ray.rpc.RayletDriver/ClusterInfo",
}


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


def check_speaks_ray(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise PipelineError unless the server at `address` answers a Ray RPC within
    `timeout` seconds: a port where another program listens is refused at once (or at
    the deadline, if it never answers) instead of Ray retrying for minutes."""
    import grpc

    kind = "client" if address.startswith("ray://") else "gcs"
    host, port = host_port(address, 10001 if kind == "client" else 6379)
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary(PROBE_METHODS[kind])
        try:
            call(b"", timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            # Only a server that implements the method can refuse the call itself.
            if code in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNIMPLEMENTED,
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.UNKNOWN,
            ):
                detail = " ".join(str(exc.details() or code.name).split())[:200]
                raise PipelineError(
                    f"{address} does not answer as a Ray cluster ({code.name.lower()}: {detail})"
                ) from exc


def check_dashboard(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise PipelineError unless a Ray dashboard answers at `address` (http://HOST:8265)
    within `timeout` seconds. Ray's job client itself waits without a deadline."""
    url = (address if "://" in address else f"http://{address}").rstrip("/") + "/api/version"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read(4096)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # a Ray dashboard with token authentication
            return
        raise PipelineError(f"{address} does not answer as a Ray dashboard (HTTP {exc.code} for /api/version)") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise PipelineError(f"{address} does not answer as a Ray dashboard ({reason})") from exc
    if b"ray_version" not in body:
        raise PipelineError(f"{address} does not answer as a Ray dashboard (no Ray version at /api/version)")


def connect(address: str | None, min_cpus: int, verbose: bool = False) -> None:
    """Start or join Ray. Without an address: a local Ray with at least `min_cpus`
    logical CPUs (so Ray Data has one left beside the training workers), which a
    watchdog process stops if this process dies without stopping it."""
    import ray

    if address and address != "auto":
        check_reachable(address, default_port=10001 if address.startswith("ray://") else 6379)
        check_speaks_ray(address)
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
        from pipeline.cluster.reaper import start_reaper

        start_reaper()
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
# Ray Data also logs a failed task's traceback before raising it; the stage reports
# the raised error itself (one line, or the traceback with --verbose).
QUIET_LOGGERS = {
    "ray": logging.WARNING,
    "ray.data": logging.CRITICAL,
    "ray.train": logging.WARNING,
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "ray.data._internal.progress": logging.ERROR,
}


def quiet_ray_loggers() -> None:
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
