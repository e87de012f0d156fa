"""Model and optimizer state as plain arrays, for exact save, load and resume.

The pipeline writes these arrays to files; this module only moves them in and out
of Keras objects.
"""

from __future__ import annotations

import numpy as np


def get_state(model, optimizer=None) -> dict[str, np.ndarray]:
    """Every model variable (`model/i`: weights and the sampler's RNG state) and optimizer
    variable (`optimizer/i`) as numpy arrays."""
    state = {f"model/{i}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)}
    if optimizer is not None:
        for i, v in enumerate(optimizer.variables):
            state[f"optimizer/{i}"] = np.asarray(v.numpy())
    return state


def set_state(state: dict[str, np.ndarray], model, optimizer=None) -> None:
    """Assign arrays saved by `get_state`; the optimizer must be built for `model`.

    Raises ValueError when the number or shapes of the arrays do not match.
    """
    _assign(state, "model", model.variables)
    if optimizer is not None:
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        _assign(state, "optimizer", optimizer.variables)


def _assign(state: dict[str, np.ndarray], prefix: str, variables) -> None:
    saved = sorted((k for k in state if k.startswith(prefix + "/")), key=lambda k: int(k.split("/")[1]))
    if len(saved) != len(variables):
        raise ValueError(f"{prefix} state has {len(saved)} arrays, expected {len(variables)}")
    for key, variable in zip(saved, variables, strict=True):
        value = state[key]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"{key}: shape {value.shape} does not match {tuple(variable.shape)}")
        variable.assign(value)
