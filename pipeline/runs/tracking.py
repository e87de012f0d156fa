"""Experiment tracking and a model registry with MLflow (the `tracking` extra).

On when `tracking.uri` or `$MLFLOW_TRACKING_URI` is set. Each pipeline run is one MLflow
run (named as the run, in experiment `tracking.experiment`; a resumed run goes on in the
same MLflow run): the flattened config as parameters, each epoch's metrics as they reach
the driver, the evaluation's numbers, `report.html`, the plots, `run.json` and the model
card as artifacts, and the ONNX decoder and encoder logged with `mlflow.onnx.log_model`.
The decoder is registered as a version of `tracking.registered_model` (its tags name the
run and the encoder's model); when the run becomes the champion, the registry alias
`champion` moves to that version, so apps may load `models:/NAME@champion`.

Tracking never costs the run: a server that is down or goes away is one warning line,
tracking stops for the rest of the run, and run.json's `tracking.error` says why. The
client's retries are kept short here ($MLFLOW_HTTP_REQUEST_MAX_RETRIES 2,
$MLFLOW_HTTP_REQUEST_TIMEOUT 10 s, unless set).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.runs.loop import RunObserver
from pipeline.schema import DECODER_ONNX, ENCODER_ONNX, MODEL_CARD_JSON, REPORT_HTML, REPORT_JSON, RUN_FILE
from pipeline.stages import Stage
from pipeline.storage import parent_and_name

log = logging.getLogger(__name__)

ALIAS = "champion"
EPOCH_METRICS = ("loss", "reconstruction", "kl", "images_per_s", "epoch_time_s", "learning_rate")
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def tracking_uri(config: Config) -> str | None:
    return config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as `a.b.c` keys (lists and scalars kept as values)."""
    if not isinstance(value, dict):
        return {prefix.rstrip("."): value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}{key}."))
    return flat


def numeric(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@contextlib.contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    """MLflow's module-level API (which `log_model` needs) pointed at `uri` for a while:
    `set_tracking_uri` also sets $MLFLOW_TRACKING_URI, which would turn tracking on for
    every later run in this process, so the old value is put back."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


class Tracker(RunObserver):
    """One pipeline run's MLflow run; every call is guarded (see the module docstring)."""

    def __init__(self, config: Config):
        self.config = config
        self.uri = tracking_uri(config)
        self.client: Any = None
        self.run_id: str | None = None
        self.model_version: str | None = None
        self.error: str | None = None
        self.name = ""

    @property
    def active(self) -> bool:
        return self.uri is not None and self.error is None

    def state(self) -> dict[str, Any]:
        """What run.json records under `tracking`."""
        if self.uri is None:
            return {}
        state = {"uri": self.uri, "run_id": self.run_id, "model_version": self.model_version}
        return {**state, "error": self.error} if self.error else state

    def _guard(self, what: str, action: Callable[[], None]) -> None:
        if not self.active:
            return
        try:
            with contextlib.redirect_stdout(sys.stderr):  # MLflow prints run links; stdout is the CLI's
                action()
        except Exception as exc:  # noqa: BLE001 - tracking must never cost the run
            self.error = f"{what}: {' '.join(str(exc).split())[:300] or type(exc).__name__}"
            log.warning("tracking: %s; the run goes on untracked (%s)", self.error, self.uri)

    def run_started(self, location: str, record: dict[str, Any]) -> None:
        self.name = parent_and_name(location)[1]
        self._guard("cannot start", lambda: self._start(location, record))
        if self.uri is not None:
            record["tracking"] = self.state()

    def _start(self, location: str, record: dict[str, Any]) -> None:
        for key, value in CLIENT_DEFAULTS.items():
            os.environ.setdefault(key, value)
        try:
            import mlflow
        except ImportError as exc:
            raise RuntimeError("MLflow is not installed (pip install 'vae-pipeline[tracking]')") from exc
        self.client = mlflow.MlflowClient(self.uri)
        earlier = record.get("tracking") or {}
        if earlier.get("uri") == self.uri and earlier.get("run_id"):
            self.run_id = earlier["run_id"]  # a resumed run goes on in its MLflow run
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(self.config.tracking.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(self.config.tracking.experiment)
        )
        run = self.client.create_run(experiment_id, run_name=self.name, tags={"vae_pipeline.location": location})
        self.run_id = run.info.run_id
        params = {k: json.dumps(v) if isinstance(v, list) else v for k, v in flatten(self.config.to_dict()).items()}
        self._log(params=params)

    def _log(self, metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None, step: int = 0):
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, v, now, step) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
        )

    def epoch(self, metrics: dict[str, Any]) -> None:
        values = numeric({k: metrics.get(k) for k in EPOCH_METRICS})
        self._guard("cannot log an epoch", lambda: self._log(metrics=values, step=int(metrics["epoch"]) + 1))

    def stage_ready(self, spec: Stage, directory: Path) -> None:
        if spec.name == "evaluate":
            self._guard("cannot log the evaluation", lambda: self._log_evaluation(directory))
        elif spec.name == "export":
            self._guard("cannot log the ONNX models", lambda: self._log_models(directory))

    def _log_evaluation(self, directory: Path) -> None:
        report = json.loads((directory / REPORT_JSON).read_text())
        metrics = {}
        for section in ("test", "clustering", "posterior"):
            metrics.update({f"{section}.{k}": v for k, v in numeric(report.get(section, {})).items()})
        self._log(metrics=metrics)
        self.client.log_artifact(self.run_id, str(directory / REPORT_HTML), "eval")
        for name in report.get("plots", []):
            self.client.log_artifact(self.run_id, str(directory / name), "eval/plots")

    def _log_models(self, directory: Path) -> None:
        import mlflow
        import onnx

        name = self.config.tracking.registered_model
        with fluent_uri(self.uri), mlflow.start_run(run_id=self.run_id, log_system_metrics=False):
            encoder = mlflow.onnx.log_model(onnx.load(directory / ENCODER_ONNX), name="encoder")
            decoder = mlflow.onnx.log_model(onnx.load(directory / DECODER_ONNX), name="decoder")
            version = mlflow.register_model(
                decoder.model_uri, name, tags={"encoder_model_uri": encoder.model_uri, "run": self.name}
            )
        self.model_version = str(version.version)
        self.client.log_artifact(self.run_id, str(directory / MODEL_CARD_JSON), "artifact")

    def run_ended(self, record: dict[str, Any]) -> None:
        if self.uri is None:
            return
        self._guard("cannot log run.json", lambda: self._log_record(record))
        if record.get("status") != "complete":
            self._guard("cannot end the run", lambda: self.client.set_terminated(self.run_id, "FAILED"))
        record["tracking"] = self.state()

    def _log_record(self, record: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / RUN_FILE
            path.write_text(json.dumps(record, indent=2))
            self.client.log_artifact(self.run_id, str(path))

    def judged(self, decision: dict[str, Any]) -> dict[str, Any]:
        """The gate's decision logged; the alias moved when the run became the champion.
        Returns what run.json records under `tracking`."""

        def log_decision() -> None:
            self.client.set_tag(self.run_id, "gate", "passed" if decision["passed"] else "failed")
            self.client.set_tag(self.run_id, "promoted", str(bool(decision.get("promoted"))).lower())
            if decision.get("promoted") and self.model_version:
                self.client.set_registered_model_alias(self.config.tracking.registered_model, ALIAS, self.model_version)
            self.client.set_terminated(self.run_id, "FINISHED")

        self._guard("cannot record the gate", log_decision)
        return self.state()


def move_alias(tracking: dict[str, Any], config: Config) -> str | None:
    """`promote`: the registry alias to the promoted run's version; a warning, never an
    error, when that cannot be done. Returns the version, or None."""
    uri, version = tracking.get("uri"), tracking.get("model_version")
    if not uri or not version:
        return None
    try:
        import mlflow

        mlflow.MlflowClient(uri).set_registered_model_alias(config.tracking.registered_model, ALIAS, version)
    except Exception as exc:  # noqa: BLE001 - the promotion itself has happened
        log.warning("tracking: cannot move the alias %s to version %s at %s (%s)", ALIAS, version, uri, exc)
        return None
    return version
