"""The gate a finished run passes before apps get its model (config section `gate`).

Absolute: the test negative ELBO at most `max_neg_elbo`, the 5-NN accuracy at least
`min_knn_accuracy` (both off unless set), the ONNX files within `max_onnx_difference` of
Keras, every number finite. Relative: no worse than the champion beyond a tolerance, in
either number. The default tolerances, 0.3 nats and 0.005, are just above the spread of
the default run across seeds (228.70-228.95 nats, 5-NN 0.873-0.876; docs/benchmarks.md):
a run inside the seed noise of the champion passes, a real step back does not.

Numbers compare only when they measure the same thing: the same likelihood, the same
dataset (its content hash) and the same k of the k-NN. Otherwise the relative check is
skipped, the absolute ones alone decide, and the decision says so.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.config import GateConfig
from pipeline.errors import PipelineError
from pipeline.schema import MODEL_CARD_JSON, REPORT_JSON
from pipeline.stages import stage
from pipeline.storage import Store, join

# Which numbers must agree for two runs' metrics to be compared.
COMPARABLE = ("likelihood", "data_sha256", "knn_k")


def read_numbers(run: Store) -> dict[str, Any]:
    """What the gate judges, from a run's evaluation report and model card."""
    report_path = join(stage("evaluate").directory, REPORT_JSON)
    card_path = join(stage("export").directory, MODEL_CARD_JSON)
    report, card = run.read_json(report_path), run.read_json(card_path)
    if not isinstance(report, dict) or not isinstance(card, dict):
        raise PipelineError(f"{run.location}: no evaluation report or model card; is the run complete?")
    try:
        differences = card["verification"]["max_abs_difference"]
        return {
            "neg_elbo": report["test"]["neg_elbo"],
            "knn_accuracy": report["clustering"]["knn_accuracy"],
            "onnx_difference": max(differences.values()),
            "likelihood": report["test"].get("likelihood", "bernoulli"),
            "data_sha256": report["data"]["content_sha256"],
            "knn_k": report["clustering"]["knn_k"],
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f"{run.location}: its report or model card lacks {exc}") from exc


def absolute_failures(numbers: dict[str, Any], gate: GateConfig) -> list[str]:
    """Why the numbers fail the absolute thresholds (empty: they pass)."""
    failures = [
        f"{name} is not finite ({numbers[name]})"
        for name in ("neg_elbo", "knn_accuracy", "onnx_difference")
        if not isinstance(numbers[name], (int, float)) or not math.isfinite(numbers[name])
    ]
    if failures:
        return failures
    if gate.max_neg_elbo is not None and numbers["neg_elbo"] > gate.max_neg_elbo:
        failures.append(f"test negative ELBO {numbers['neg_elbo']:.3f} > gate.max_neg_elbo {gate.max_neg_elbo}")
    if gate.min_knn_accuracy is not None and numbers["knn_accuracy"] < gate.min_knn_accuracy:
        failures.append(f"5-NN accuracy {numbers['knn_accuracy']:.4f} < gate.min_knn_accuracy {gate.min_knn_accuracy}")
    if numbers["onnx_difference"] > gate.max_onnx_difference:
        failures.append(
            f"ONNX differs from Keras by {numbers['onnx_difference']:.3g} > gate.max_onnx_difference "
            f"{gate.max_onnx_difference}"
        )
    return failures


def relative_failures(numbers: dict[str, Any], champion: dict[str, Any], name: str, gate: GateConfig) -> list[str]:
    """Why the numbers are worse than the champion `name`'s beyond the tolerances."""
    failures = []
    if numbers["neg_elbo"] > champion["neg_elbo"] + gate.neg_elbo_tolerance:
        failures.append(
            f"test negative ELBO {numbers['neg_elbo']:.3f} is worse than champion {name}'s "
            f"{champion['neg_elbo']:.3f} by more than {gate.neg_elbo_tolerance} nats"
        )
    if numbers["knn_accuracy"] < champion["knn_accuracy"] - gate.knn_tolerance:
        failures.append(
            f"5-NN accuracy {numbers['knn_accuracy']:.4f} is worse than champion {name}'s "
            f"{champion['knn_accuracy']:.4f} by more than {gate.knn_tolerance}"
        )
    return failures


def judge(
    numbers: dict[str, Any], gate: GateConfig, champion: tuple[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The gate's decision on a run's numbers, against the champion (name, numbers) if any."""
    failures = absolute_failures(numbers, gate)
    decision: dict[str, Any] = {"metrics": numbers, "champion": None, "compared": False}
    if champion is None:
        decision["note"] = "no champion yet: absolute thresholds only"
    else:
        name, theirs = champion
        decision["champion"] = {"run": name, "metrics": theirs}
        differs = [key for key in COMPARABLE if theirs.get(key) != numbers[key]]
        if differs:
            decision["note"] = (
                f"not compared with champion {name}: its {', '.join(differs)} differ; absolute thresholds only"
            )
        else:
            decision["compared"] = True
            decision["note"] = f"compared with champion {name}"
            failures += relative_failures(numbers, theirs, name, gate)
    decision.update(passed=not failures, reasons=failures)
    return decision
