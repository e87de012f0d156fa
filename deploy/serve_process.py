"""The process behind `vae-generate serve`: start Ray (or join one), run the Serve
application of deploy.serve until SIGINT or SIGTERM, then stop it, and the HAProxy
ingress a local Ray leaves behind, without being cut short by a second signal.

While it serves, it asks every `watch_s` seconds which artifact `--model` names
(deploy.follow: `RUNS/champion` moves when the pipeline promotes a run). When that
changes, the new artifact is verified here and handed to the replicas as `user_config`,
which they apply in place (deploy.serve); one that fails verification is refused with a
warning and the model serving goes on serving."""

import os
import shutil
import signal
import sys
import time
from pathlib import Path

from ray import serve

from deploy.artifact import ArtifactError
from deploy.follow import resolve_artifact
from deploy.serve import APP_NAME, REQUEST_TIMEOUT_S, Limits, build

# After Ray's shutdown, how long no new HAProxy of ours may appear before serving stops.
HAPROXY_QUIET_S = 3.0


def choose_ingress(ingress: str) -> str:
    """ "haproxy" or "python": Ray Serve's HTTP ingress. HAProxy (Ray >= 2.55, with direct
    data-plane calls to the replicas) carries 2-3x the requests of Serve's Python proxy
    on 2 cores (docs/benchmarks.md); "auto" takes it when `haproxy` is installed. Set
    before Ray starts: the proxy and replicas read it from their environment."""
    if ingress not in ("auto", "haproxy", "python"):
        raise ValueError(f"ingress must be auto, haproxy or python, got {ingress!r}")
    if ingress == "auto":
        ingress = "haproxy" if shutil.which("haproxy") else "python"
    if ingress == "haproxy" and not shutil.which("haproxy"):
        raise ValueError("--ingress haproxy: no haproxy on PATH (apt-get install haproxy)")
    flag = "1" if ingress == "haproxy" else "0"
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = flag
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = flag
    return ingress


class Follower:
    """Re-reads which artifact `model` names and moves the application to it."""

    def __init__(self, model: Path, replicas: int, limits: Limits):
        self.model, self.replicas, self.limits = model, replicas, limits
        self.first = self.serving = resolve_artifact(model)
        self.refused: Path | None = None

    def application(self):
        return build(self.first, self.replicas, self.limits, model=self.serving)

    def check(self) -> None:
        """Serve what `model` names now, if that changed and it verifies."""
        target = resolve_artifact(self.model)
        if target in (self.serving, self.refused):
            return
        try:
            application = build(self.first, self.replicas, self.limits, model=target)
        except (ArtifactError, OSError, ValueError) as exc:
            self.refused = target
            print(f"vae-generate serve: warning: not switching to {target}: {exc}", file=sys.stderr, flush=True)
            return
        started = time.monotonic()
        serve.run(application, name=APP_NAME, route_prefix="/")
        print(f"now serving {target} (swapped in {time.monotonic() - started:.1f} s)", flush=True)
        self.serving, self.refused = target, None


def serve_forever(
    artifact_dir: Path,
    host: str,
    port: int,
    replicas: int,
    limits: Limits,
    address: str | None,
    ingress: str = "auto",
    watch_s: float = 5.0,
) -> None:
    """Start Ray (or join `address`), run the application on host:port, and block until
    interrupted, following `artifact_dir` every `watch_s` seconds (0: never); then shut
    Serve down."""
    import ray

    follower = Follower(Path(artifact_dir), replicas, limits)
    application = follower.application()
    ingress = choose_ingress(ingress)
    # "local": a new Ray of our own, never one that happens to run on this machine.
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
    # After ray.init, which sets its own: SIGTERM (kill, docker stop, systemd) stops serving
    # exactly as Ctrl-C does, through the cleanup below: service managers send it, and a
    # script's background job, which Ctrl-C cannot reach, ignores SIGINT.
    signal.signal(signal.SIGTERM, _interrupt)
    node_id = ray.get_runtime_context().get_node_id()
    try:
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": REQUEST_TIMEOUT_S})
        serve.run(application, name=APP_NAME, route_prefix="/")
        print(
            f"serving {follower.serving} on http://{host}:{port} ({replicas} replica{'s' * (replicas != 1)}, "
            f"{ingress} ingress); Ctrl-C or SIGTERM stops",
            flush=True,
        )
        while True:
            time.sleep(watch_s or 3600)
            if watch_s:
                follower.check()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        # On a cluster of its own the application goes with Ray (Serve's own shutdown
        # drains for half a minute); on a shared cluster only this application is removed.
        if address:
            serve.delete(APP_NAME)
            shutdown_ray_ignoring_sigterm()
        else:
            ingress_processes = own_haproxy(node_id)
            shutdown_ray_ignoring_sigterm()
            stop_own_haproxy(node_id, ingress_processes)


def shutdown_ray_ignoring_sigterm(every_s: float = 0.005) -> None:
    """ray.shutdown() with SIGTERM kept ignored: Ray's core resets SIGTERM to its default
    action (terminate) about 0.3 s into its shutdown, which takes 1.4 s here, and only the
    main thread may set a handler. So the shutdown runs in a thread while this one puts
    the ignore back every `every_s`."""
    import threading

    import ray

    failure: list[BaseException] = []

    def shutdown() -> None:
        try:
            ray.shutdown()
        except BaseException as exc:  # raised again below, in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=shutdown, name="ray-shutdown")
    thread.start()
    while thread.is_alive():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        thread.join(every_s)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if failure:
        raise failure[0]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_own_haproxy(node_id: str, earlier: list, quiet_s: float = HAPROXY_QUIET_S) -> None:
    """Stop `earlier` and every HAProxy of this node, then keep looking until none has
    come for `quiet_s` (at most 10x that): a proxy actor can outlive ray.shutdown() by a
    moment and start one more HAProxy (a graceful reload)."""
    import time

    stop_processes(list({p.pid: p for p in earlier + own_haproxy(node_id)}.values()))
    quiet_since = started = time.monotonic()
    while time.monotonic() - quiet_since < quiet_s and time.monotonic() - started < 10 * quiet_s:
        time.sleep(0.2)
        if late := own_haproxy(node_id):
            stop_processes(late)
            quiet_since = time.monotonic()


def own_haproxy(node_id: str) -> list:
    """The HAProxy processes this process's own Ray started: Ray's shutdown kills the
    proxy actor but not the HAProxy it runs, which would keep holding the port. Found as
    descendants, and by the config path Serve gives each node's HAProxy (it names the node):
    once the worker that started it has gone, HAProxy is orphaned, no longer a descendant."""
    import psutil

    descendants = {child.pid for child in psutil.Process().children(recursive=True)}
    found = []
    for process in psutil.process_iter(["name", "cmdline", "status"]):
        info = process.info
        if info["name"] != "haproxy" or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if process.pid in descendants or any(node_id in arg for arg in info["cmdline"] or ()):
            found.append(process)
    return found


def stop_processes(processes: list, grace_s: float = 5.0) -> None:
    """Terminate, then kill what is still running after `grace_s` (pipeline.cluster.reaper's
    pattern; `deploy` does not import `pipeline`)."""
    import psutil

    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            continue
