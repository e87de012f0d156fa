"""After a run completes: `latest` moves to it, the gate judges it, and `champion` moves to it
if it passed. `vae-pipeline promote RUN` moves `champion` by hand (a rollback, or an
override of the gate); it still refuses a run that is not complete.

The gate's relative check reads the champion inside the pointer's update (under its lock,
or its conditional write), so two runs finishing at once are judged one after the other:
the pointer ends naming the better of them. The decision goes into run.json (`gate`) and
into the evaluation report's page.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import GateRejected, PipelineError
from pipeline.report.html import with_gate_section
from pipeline.runs.gate import judge, read_numbers
from pipeline.runs.loop import is_run_record
from pipeline.runs.pointers import Pointers
from pipeline.runs.tracking import Tracker, move_alias
from pipeline.schema import CHAMPION, LATEST, REPORT_HTML, RUN_FILE
from pipeline.stages import stage
from pipeline.storage import Store, is_uri, join, parent_and_name

log = logging.getLogger(__name__)


def pointers_for(runs_root: str | None, location: str) -> Pointers | None:
    """The pointers of `runs_root` when the run lives directly in it, else None (a run kept
    elsewhere with --run-dir is judged but moves no pointer)."""
    if runs_root is None:
        return None
    if is_uri(location):
        inside = parent_and_name(location.rstrip("/"))[0] == runs_root.rstrip("/")
    else:
        inside = not is_uri(runs_root) and Path(location).resolve().parent == Path(runs_root).resolve()
    return Pointers(runs_root) if inside else None


def read_complete_record(run: Store) -> dict[str, Any]:
    """run.json of a run that completed every stage; PipelineError for any other."""
    record = run.read_json(RUN_FILE)
    if not is_run_record(record):
        raise PipelineError(f"{run.location}: not a run of this pipeline (no {RUN_FILE})")
    if record.get("status") != "complete" or record.get("stages", {}).get("export", {}).get("status") != "complete":
        raise PipelineError(f"{run.location}: the run is not complete (status: {record.get('status', 'unknown')})")
    return record


def started(root: Store, name: str | None) -> float:
    record = root.read_json(join(name, RUN_FILE)) if name else None
    return record.get("started", 0.0) if isinstance(record, dict) else 0.0


def finish_run(location: str, config: Config, pointers: Pointers | None, tracker: Tracker) -> dict[str, Any]:
    """Point `latest` at the completed run at `location`, judge it, and make it the champion
    if it passed; record the decision (in run.json, the report's page and the tracker).
    Raises GateRejected when it did not pass."""
    run = Store.open(location)
    record = read_complete_record(run)
    name = parent_and_name(run.location)[1]
    numbers = read_numbers(run)
    if pointers is None:
        decision = judge(numbers, config.gate)
    else:
        pointers.update(LATEST, lambda current: name if started(pointers.root, current) <= record["started"] else None)
        decision = {}

        def decide(current: str | None) -> str | None:
            champion = None
            if current is not None and current != name:
                champion = (current, read_numbers(pointers.root.child(current)))
            decision.clear()
            decision.update(judge(numbers, config.gate, champion))
            if current == name:  # run again (cached, or --force): judged on its own numbers
                decision["note"] = "already the champion: absolute thresholds only"
            return name if decision["passed"] else None

        pointers.update(CHAMPION, decide)
    decision.update(promoted=pointers is not None and decision["passed"], time=time.time(), how="gate")
    if tracker.uri is not None:
        record["tracking"] = tracker.judged(decision)
    record_decision(run, record, decision)
    if not decision["passed"]:
        raise GateRejected(f"gate: {run.location} not promoted: {'; '.join(decision['reasons'])}")
    log.info("gate: passed (%s)%s", decision["note"], f"; {pointers.uri(CHAMPION)} -> {name}" if pointers else "")
    return decision


def promote(location: str) -> str | None:
    """`vae-pipeline promote RUN`: make a complete run the champion of the runs root it is
    in, whatever the gate said; returns the run it replaced (or None)."""
    run = Store.open(location)
    record = read_complete_record(run)
    parent, name = parent_and_name(run.location)
    numbers = read_numbers(run)
    pointers = Pointers(parent)
    replaced: list[str | None] = []

    def decide(current: str | None) -> str:
        replaced[:] = [current]
        return name

    pointers.update(CHAMPION, decide)
    decision = {**record.get("gate", {}), "metrics": numbers, "promoted": True, "time": time.time(), "how": "manual"}
    decision["replaced"] = replaced[0]
    decision["model_version"] = move_alias(record.get("tracking") or {}, Config.from_dict(record["config"]))
    record_decision(run, record, decision)
    return replaced[0]


def record_decision(run: Store, record: dict[str, Any], decision: dict[str, Any]) -> None:
    """The decision in run.json and on the evaluation report's page."""
    record["gate"] = decision
    run.write_json(RUN_FILE, record)
    page = join(stage("evaluate").directory, REPORT_HTML)
    text = run.read_bytes(page)
    if text is not None:
        run.write_text(page, with_gate_section(text.decode(), decision))
