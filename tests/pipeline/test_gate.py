"""The gate's rules on their own (the runs that exercise them end to end are in
test_scheduled_runs.py)."""

import pytest

from pipeline.config import GateConfig, load_config
from pipeline.errors import PipelineError
from pipeline.runs.gate import judge

CHAMPION = {
    "neg_elbo": 228.95,
    "knn_accuracy": 0.876,
    "onnx_difference": 3.5e-6,
    "likelihood": "bernoulli",
    "data_sha256": "a" * 64,
    "knn_k": 5,
}


def test_within_the_seed_spread_passes_beyond_it_fails():
    gate = GateConfig()
    inside = {**CHAMPION, "neg_elbo": 228.95 + 0.25, "knn_accuracy": 0.876 - 0.003}
    assert judge(inside, gate, ("run-1", CHAMPION))["passed"] is True
    worse = {**CHAMPION, "neg_elbo": 228.95 + 0.35}
    decision = judge(worse, gate, ("run-1", CHAMPION))
    assert decision["passed"] is False and decision["compared"] is True
    assert decision["reasons"] == [
        "test negative ELBO 229.300 is worse than champion run-1's 228.950 by more than 0.3 nats"
    ]


@pytest.mark.parametrize("key, value", [("likelihood", "continuous_bernoulli"), ("data_sha256", "b" * 64)])
def test_numbers_of_another_kind_are_not_compared(key, value):
    much_worse = {**CHAMPION, key: value, "neg_elbo": 400.0, "knn_accuracy": 0.5}
    decision = judge(much_worse, GateConfig(), ("run-1", CHAMPION))
    assert decision["passed"] is True and decision["compared"] is False
    assert decision["note"] == f"not compared with champion run-1: its {key} differ; absolute thresholds only"
    assert judge(much_worse, GateConfig(max_neg_elbo=300.0))["reasons"] == [
        "test negative ELBO 400.000 > gate.max_neg_elbo 300.0"
    ]


def test_non_finite_numbers_and_a_loose_export_fail_alone():
    assert judge({**CHAMPION, "neg_elbo": float("nan")}, GateConfig())["reasons"] == ["neg_elbo is not finite (nan)"]
    assert judge({**CHAMPION, "onnx_difference": 2e-4}, GateConfig())["reasons"] == [
        "ONNX differs from Keras by 0.0002 > gate.max_onnx_difference 0.0001"
    ]


def test_gate_settings_are_checked_on_load():
    with pytest.raises(PipelineError, match=r"^config: gate.knn_tolerance must be in \[0, 1\]$"):
        load_config(overrides=["gate.knn_tolerance=2"])
    with pytest.raises(PipelineError, match="config: unknown key tracking.url"):
        load_config(overrides=["tracking.url=http://x"])
