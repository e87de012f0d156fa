"""Submitting `vae-pipeline run` to a Ray cluster as a Ray Job, and following it up.

The job's `working_dir` holds the three packages the run imports (pipeline, vae and deploy,
copied from wherever they are imported here: a checkout or an installed copy), so the job
runs this code whatever the cluster has installed; the cluster's nodes need the
dependencies (the images under docker/ have them).
The resolved config travels as explicit `--set` arguments, so the job runs exactly the
configuration resolved here. The run's name is chosen here, so the user learns where it
will land before the job starts; with an object-store runs root (see
pipeline.runs.remote) that is a URI every node and `vae-pipeline fetch` reach.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cluster.connection import check_dashboard, check_reachable
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.schema import CLUSTER_RUNS_ROOT
from pipeline.storage import is_uri, join

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# What the job's driver imports. Not the directory above them: in an installed copy (the
# pipeline image) that is site-packages, gigabytes; in a checkout, whatever else is kept there.
PACKAGES = ("pipeline", "vae", "deploy")
# Left out of them: npm's packages and onnxruntime-web's files (the browser page's, not the run's).
LEFT_OUT = ("__pycache__", "node_modules", "ort", "ort.tmp-*")
AGENT_WAIT_S = 60


def flatten_overrides(config: Config) -> list[str]:
    """The whole config as `section.key=json` strings that `--set` reads back exactly.

    Unset (None) values are left out, so that on the cluster the defaults, and the
    job's own RAY_ADDRESS for `ray.address`, apply.
    """
    items = []
    for key, value in config.to_dict().items():
        pairs = value.items() if isinstance(value, dict) else [(None, value)]
        for name, v in pairs:
            if v is not None:
                items.append(f"{key if name is None else f'{key}.{name}'}={v if isinstance(v, str) else json.dumps(v)}")
    return items


def entrypoint(config: Config, runs_root: str, run_dir: str | None) -> str:
    args = ["python", "-m", "pipeline.cli", "run", "--runs-root", runs_root]
    if run_dir:
        args += ["--run-dir", run_dir]
    for item in flatten_overrides(config):
        args += ["--set", item]
    return shlex.join(args)


def client(address: str):
    check_reachable(address, default_port=8265)
    check_dashboard(address)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:  # pragma: no cover - the train extra brings ray[default]
        raise PipelineError("job submission needs ray[default] (pip install '.[train]')") from exc
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # connection errors come in several types
        raise PipelineError(f"cannot use Ray Jobs at {address}: {str(exc).splitlines()[0]}") from exc


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    run_location: str
    where: str  # "" for an object-store URI; else which node's disk the path is on


def job_run_location(runs_root: str) -> str:
    """A run name chosen on the client, so that the user learns it before the job starts.
    The client cannot list the runs root (it may be a path on the cluster), so a random
    suffix, not a listing as `pipeline.runs.remote.new_run_location`, keeps two jobs apart."""
    return join(runs_root, f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")


def stage_packages(into: Path) -> Path:
    """Copy the packages the job imports into `into`, the job's working_dir: its current
    directory there, so `python -m pipeline.cli` imports this copy before any installed one."""
    for name in PACKAGES:
        source = importlib.util.find_spec(name).submodule_search_locations[0]
        shutil.copytree(source, into / name, ignore=shutil.ignore_patterns(*LEFT_OUT))
    return into


def submit(
    address: str, config: Config, runs_root: str = CLUSTER_RUNS_ROOT, run_dir: str | None = None
) -> SubmittedJob:
    """Submit the run; returns the job id and where the run will land."""
    jobs = client(address)
    run_dir = run_dir or job_run_location(runs_root)
    where = (
        ""
        if is_uri(run_dir)
        else " on the node that runs the job's driver (an s3:// or gs:// --runs-root reaches every node and `fetch`)"
    )
    command = entrypoint(config, runs_root, run_dir)
    deadline = time.monotonic() + AGENT_WAIT_S
    with tempfile.TemporaryDirectory(prefix="vae-submit-") as staging:
        runtime_env: dict[str, Any] = {
            "working_dir": str(stage_packages(Path(staging))),  # uploaded by submit_job
            "env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"},
        }
        while True:
            try:
                return SubmittedJob(jobs.submit_job(entrypoint=command, runtime_env=runtime_env), run_dir, where)
            except RuntimeError as exc:
                # A freshly started head answers before its job agent is up: wait for it.
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise PipelineError(f"job submission to {address} failed: {str(exc).splitlines()[0]}") from exc
                time.sleep(2)


def follow(address: str, job_id: str, echo=print, poll_s: float = 1.0) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    jobs = client(address)
    printed = 0
    while True:
        status = str(job_status(jobs, job_id))
        logs = jobs.get_job_logs(job_id)
        if len(logs) > printed:
            echo(logs[printed:].rstrip("\n"))
            printed = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def job_status(jobs, job_id: str) -> str:
    try:
        status = jobs.get_job_status(job_id)
    except Exception as exc:  # RuntimeError for unknown ids, others for transport
        raise PipelineError(f"job {job_id}: {str(exc).splitlines()[0]}") from exc
    return getattr(status, "value", str(status))


def status(address: str, job_id: str) -> str:
    return job_status(client(address), job_id)


def logs(address: str, job_id: str) -> str:
    jobs = client(address)
    job_status(jobs, job_id)  # a clear error for an unknown id
    return jobs.get_job_logs(job_id)
