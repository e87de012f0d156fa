"""Model and optimizer state as plain arrays, for exact save, load and resume.

Arrays are keyed by each variable's path (`model/encoder_dense/kernel`,
`optimizer/encoder_dense_kernel_momentum`: an optimizer's path less its own name, which
Keras numbers per process), never by position: renaming or
reordering a layer makes a load fail, naming what is missing, instead of putting
weights in the wrong place. The pipeline writes these arrays to files; this module
only moves them in and out of Keras objects.
"""

from __future__ import annotations

import numpy as np


def get_state(model=None, optimizer=None) -> dict[str, np.ndarray]:
    """Every model variable (weights and the sampler's RNG state) as `model/<path>`, and
    every optimizer variable as `optimizer/<path>`, as numpy arrays."""
    state = {} if model is None else _arrays("model", model.variables)
    if optimizer is not None:
        state.update(_arrays("optimizer", optimizer.variables))
    return state


def set_state(state: dict[str, np.ndarray], model=None, optimizer=None) -> None:
    """Assign arrays saved by `get_state` to the model and/or the optimizer; an optimizer
    not yet built is built for `model`.

    Raises ValueError naming the first missing, unexpected or wrongly shaped array.
    """
    if model is not None:
        _assign(state, "model", model.variables)
    if optimizer is not None:
        if not optimizer.built:
            if model is None:
                raise ValueError("set_state: an optimizer that is not built needs the model")
            optimizer.build(model.trainable_variables)
        _assign(state, "optimizer", optimizer.variables)


def _key(prefix: str, variable) -> str:
    path = variable.path if prefix == "model" else variable.path.split("/", 1)[-1]
    return f"{prefix}/{path}"


def _arrays(prefix: str, variables) -> dict[str, np.ndarray]:
    arrays = {_key(prefix, v): np.asarray(v.numpy()) for v in variables}
    if len(arrays) != len(variables):
        raise ValueError(f"{prefix} variables do not have unique paths")
    return arrays


def _assign(state: dict[str, np.ndarray], prefix: str, variables) -> None:
    expected = {_key(prefix, v): v for v in variables}
    saved = {key for key in state if key.startswith(prefix + "/")}
    missing, unexpected = sorted(set(expected) - saved), sorted(saved - set(expected))
    if missing or unexpected:
        what = f"no array for {missing[0]}" if missing else f"unexpected array {unexpected[0]}"
        raise ValueError(f"{prefix} state does not fit: {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, variable in expected.items():
        value = state[key]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"{key}: shape {value.shape} does not match {tuple(variable.shape)}")
    for key, variable in expected.items():
        variable.assign(state[key])
