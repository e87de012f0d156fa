"""Reading and writing model state: training checkpoints and the final model directory.

A checkpoint directory holds `state.npz` (model weights and optimizer variables, see
`vae.state`) and `checkpoint.json` (epoch, config, metrics history). The final model
directory, TRAIN_DIR/model/, holds `weights.npz` (model weights only) and
`model.json` (the VAE architecture and training facts): enough to rebuild the model
from its stored config alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_directory, write_json
from pipeline.errors import PipelineError
from pipeline.schema import MODEL_CONFIG_FILE, MODEL_DIR, MODEL_WEIGHTS_FILE

STATE_FILE = "state.npz"
CHECKPOINT_INFO_FILE = "checkpoint.json"


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # np.savez has no notion of "/" in keys being special; keep them as given.
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable weights file ({exc})") from exc


def write_checkpoint(directory: Path, state: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_arrays(directory / STATE_FILE, state)
    write_json(directory / CHECKPOINT_INFO_FILE, info)


def read_checkpoint(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    directory = Path(directory)
    info_path = directory / CHECKPOINT_INFO_FILE
    if not info_path.is_file():
        raise PipelineError(f"{directory}: not a training checkpoint (no {CHECKPOINT_INFO_FILE})")
    return load_arrays(directory / STATE_FILE), json.loads(info_path.read_text())


def model_weights(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model part of a checkpoint state (drops optimizer variables)."""
    return {key: value for key, value in state.items() if key.startswith("model/")}


def write_model_dir(train_dir: Path, state: dict[str, np.ndarray], info: dict[str, Any]) -> Path:
    """Write TRAIN_DIR/model/ atomically; `info` must hold the `architecture` dict."""
    if "architecture" not in info:
        raise ValueError("model info needs an 'architecture' entry")
    target = Path(train_dir) / MODEL_DIR
    with atomic_directory(target) as tmp:
        save_arrays(tmp / MODEL_WEIGHTS_FILE, model_weights(state))
        write_json(tmp / MODEL_CONFIG_FILE, info)
    return target


def read_model_info(train_dir: Path) -> dict[str, Any]:
    path = Path(train_dir) / MODEL_DIR / MODEL_CONFIG_FILE
    if not path.is_file():
        raise PipelineError(f"{train_dir}: no trained model ({MODEL_DIR}/{MODEL_CONFIG_FILE} missing)")
    return json.loads(path.read_text())


def load_model(train_dir: Path):
    """Rebuild the trained VAE from TRAIN_DIR/model/; returns (model, info)."""
    from vae import VAEConfig, build_vae, set_state

    info = read_model_info(train_dir)
    weights_path = Path(train_dir) / MODEL_DIR / MODEL_WEIGHTS_FILE
    if not weights_path.is_file():
        raise PipelineError(f"{train_dir}: {MODEL_DIR}/{MODEL_WEIGHTS_FILE} missing")
    model = build_vae(VAEConfig.from_dict(info["architecture"]), seed=info.get("seed"))
    try:
        set_state(load_arrays(weights_path), model)
    except ValueError as exc:
        raise PipelineError(f"{weights_path}: does not fit the stored architecture ({exc})") from exc
    return model, info
