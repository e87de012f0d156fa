"""Stopping the local Ray a CLI process started, when that process ends however it ends.

Ray's head processes die with the driver that started them, but its dashboard and
runtime-env agents (about 220 MB) outlive a driver killed with SIGKILL by up to a
minute, and an unattended job killed over and over piles them up. So before it starts
a local Ray, the CLI starts this module as a separate watchdog process, joined to it
by a pipe that only the CLI holds open. The watchdog notes the CLI's descendants every
second; when the pipe closes (the CLI exited, crashed or was killed), it stops every
one of them that is still running, then exits itself.

    python -m pipeline.cluster.reaper PID      (stdin: the pipe from process PID)
"""

from __future__ import annotations

import os
import select
import subprocess
import sys

POLL_S = 1.0
TERM_GRACE_S = 3.0

_watchdog: subprocess.Popen | None = None  # this process's watchdog, once started


def start_reaper() -> None:
    """Start the watchdog for this process (once); it lives in its own session, so a
    Ctrl-C meant for the CLI does not stop it before it has cleaned up."""
    global _watchdog
    if _watchdog is not None and _watchdog.poll() is None:
        return
    _watchdog = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cluster.reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def track(parent: int, tracked: dict[int, float]) -> None:
    """Add `parent`'s living descendants to `tracked` (pid -> start time)."""
    import psutil

    try:
        children = psutil.Process(parent).children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            if child.pid != os.getpid():
                tracked[child.pid] = child.create_time()
        except psutil.Error:
            continue


def stop(tracked: dict[int, float]) -> None:
    """Terminate every tracked process still running (the same process, not a new one
    that reused its pid), and kill those that do not exit within the grace period."""
    import psutil

    alive = []
    for pid, started in tracked.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started:
                process.terminate()
                alive.append(process)
        except psutil.Error:
            continue
    _, remaining = psutil.wait_procs(alive, timeout=TERM_GRACE_S)
    for process in remaining:
        try:
            process.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(remaining, timeout=TERM_GRACE_S)


def watch(parent: int) -> None:
    """Track `parent`'s descendants until stdin reaches end of file, then stop them."""
    tracked: dict[int, float] = {}
    while True:
        track(parent, tracked)
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], POLL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
    stop(tracked)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
