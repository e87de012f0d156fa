"""The continuous Bernoulli in numpy (float64): its log normaliser, its mean, and the
logits of a given mean. For the evaluation's baseline and the ONNX checks, which run
on arrays; the training objective's Keras twins are in vae.objective."""

from __future__ import annotations

import numpy as np


def cb_log_norm(logits: np.ndarray) -> np.ndarray:
    """numpy twin of vae.objective.continuous_bernoulli_log_norm (float64)."""
    a = np.maximum(np.abs(logits), 1e-3)
    exact = np.log(a) - np.log(-np.expm1(-a)) + np.log1p(np.exp(-a))
    return np.where(np.abs(logits) < 1e-3, np.log(2.0) + np.square(logits) / 12.0, exact)


def cb_mean(logits: np.ndarray) -> np.ndarray:
    """numpy: the continuous Bernoulli's mean 1 / (1 - exp(-l)) - 1 / l (1/2 at 0)."""
    small = np.abs(logits) < 1e-4
    safe = np.where(small, 1.0, logits)
    with np.errstate(over="ignore"):  # exp(-l) -> inf for l << 0: the first term -> 0, rightly
        return np.where(small, 0.5 + logits / 12.0, 1.0 / -np.expm1(-safe) - 1.0 / safe)


def cb_logits_for_means(means: np.ndarray, iterations: int = 80) -> np.ndarray:
    """The logits whose continuous Bernoulli means are `means` (in (0, 1)); the mean
    rises with the logit, so bisection on [-1e6, 1e6] (means 1e-6 to 1 - 1e-6)."""
    low, high = np.full(means.shape, -1e6), np.full(means.shape, 1e6)
    for _ in range(iterations):
        middle = (low + high) / 2
        above = cb_mean(middle) > means
        high, low = np.where(above, middle, high), np.where(above, low, middle)
    return (low + high) / 2
