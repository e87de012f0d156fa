"""`vae-pipeline runs [RUNS]`: every run under a runs root, one line each, oldest first:
name, start, status, test negative ELBO, 5-NN accuracy, the gate's verdict, and which
runs `latest` and `champion` name. `--json` gives the same as a list of objects."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

from pipeline.errors import PipelineError
from pipeline.runs.gate import read_numbers
from pipeline.runs.loop import is_run_record
from pipeline.runs.pointers import POINTERS, Pointers
from pipeline.schema import RUN_FILE
from pipeline.storage import Store, join


def process_gone(record: dict[str, Any]) -> bool:
    """A local run that says "running" but whose process is no longer there (killed)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or record.get("host") not in (None, platform.node()):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def describe(root: Store, name: str, record: dict[str, Any], marks: list[str]) -> dict[str, Any]:
    status = record.get("status", "unknown")
    if status == "running" and not root.is_remote and process_gone(record):
        status = "killed"
    numbers: dict[str, Any] = {}
    if status == "complete":
        try:
            numbers = read_numbers(root.child(name))
        except PipelineError:
            numbers = {}
    gate = record.get("gate") or {}
    return {
        "run": name,
        "location": root.uri(name),
        "started": record.get("started"),
        "status": status,
        "neg_elbo": numbers.get("neg_elbo"),
        "knn_accuracy": numbers.get("knn_accuracy"),
        "gate": None if not gate else ("passed" if gate.get("passed") else "failed"),
        "pointers": marks,
        "error": record.get("error"),
    }


def list_runs(runs_root: str) -> list[dict[str, Any]]:
    """Every run of this pipeline directly under `runs_root`, oldest first."""
    root = Store.open(runs_root)
    pointers = Pointers(runs_root)
    named = {pointer: pointers.read(pointer) for pointer in POINTERS}
    rows = []
    for name in root.list_directories():
        if name in POINTERS:  # on disk, links to run directories
            continue
        record = root.read_json(join(name, RUN_FILE))
        if is_run_record(record):
            marks = [pointer for pointer in POINTERS if named[pointer] == name]
            rows.append(describe(root, name, record, marks))
    return sorted(rows, key=lambda row: (row["started"] or 0, row["run"]))


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    """The table `vae-pipeline runs` prints."""
    lines = [f"{'RUN':<26} {'STARTED':<16} {'STATUS':<11} {'-ELBO':>9} {'5-NN':>7} {'GATE':<7} POINTERS"]
    for row in rows:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["started"])) if row["started"] else "-"
        elbo = f"{row['neg_elbo']:.3f}" if row["neg_elbo"] is not None else "-"
        knn = f"{row['knn_accuracy']:.4f}" if row["knn_accuracy"] is not None else "-"
        lines.append(
            f"{row['run']:<26} {started:<16} {row['status']:<11} {elbo:>9} {knn:>7} {row['gate'] or '-':<7} "
            f"{','.join(row['pointers'])}".rstrip()
        )
    return lines
