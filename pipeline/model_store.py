"""Reading and writing model state: training checkpoints and the final model directory.

A checkpoint directory holds `state.npz` (model weights and optimizer variables, see
`vae.state`) and `checkpoint.json` (epoch, config, metrics history). The final model
directory, TRAIN_DIR/model/, holds `weights.npz` (model weights only) and
`model.json` (the VAE architecture and training facts): enough to rebuild the model
from its stored config alone.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from deploy.artifact import sha256_file
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
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise PipelineError(f"{path}: unreadable weights file ({str(exc).splitlines()[0]})") from exc


def non_finite_arrays(arrays: dict[str, np.ndarray]) -> list[str]:
    """Names of the floating-point arrays that hold a NaN or an infinity."""
    return sorted(
        key
        for key, value in arrays.items()
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()
    )


def write_checkpoint(directory: Path, state: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_arrays(directory / STATE_FILE, state)
    write_json(directory / CHECKPOINT_INFO_FILE, info)


def read_checkpoint(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    directory = Path(directory)
    info_path = directory / CHECKPOINT_INFO_FILE
    if not info_path.is_file():
        raise PipelineError(f"{directory}: not a training checkpoint (no {CHECKPOINT_INFO_FILE})")
    return load_arrays(directory / STATE_FILE), read_json(info_path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable JSON ({str(exc).splitlines()[0]})") from exc


def model_weights(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model part of a checkpoint state (drops optimizer variables)."""
    return {key: value for key, value in state.items() if key.startswith("model/")}


def write_model_dir(train_dir: Path, state: dict[str, np.ndarray], info: dict[str, Any]) -> Path:
    """Write TRAIN_DIR/model/ atomically; `info` must hold the `architecture` dict.

    Refuses (PipelineError) weights that hold a NaN or an infinity: a diverged model is
    never written as a trained one.
    """
    if "architecture" not in info:
        raise ValueError("model info needs an 'architecture' entry")
    weights = model_weights(state)
    bad = non_finite_arrays(weights)
    if bad:
        raise PipelineError(f"training produced non-finite weights ({len(bad)} arrays, e.g. {bad[0]}); not saved")
    target = Path(train_dir) / MODEL_DIR
    with atomic_directory(target) as tmp:
        save_arrays(tmp / MODEL_WEIGHTS_FILE, weights)
        write_json(tmp / MODEL_CONFIG_FILE, {**info, "weights_sha256": sha256_file(tmp / MODEL_WEIGHTS_FILE)})
    return target


def read_model_info(train_dir: Path) -> dict[str, Any]:
    """TRAIN_DIR/model/model.json, with the fields every reader needs checked."""
    path = Path(train_dir) / MODEL_DIR / MODEL_CONFIG_FILE
    if not path.is_file():
        raise PipelineError(f"{train_dir}: no trained model ({MODEL_DIR}/{MODEL_CONFIG_FILE} missing)")
    info = read_json(path)
    if not isinstance(info, dict) or not isinstance(info.get("architecture"), dict):
        raise PipelineError(f"{path}: not a model description (no architecture)")
    if not isinstance(info.get("weights_sha256"), str):
        raise PipelineError(f"{path}: records no weights_sha256 (written by an older vae-pipeline); train again")
    return info


def check_model_dir(train_dir: Path) -> dict[str, Any]:
    """Check TRAIN_DIR/model/ without building the model: model.json readable, an
    architecture the model accepts, weights.npz matching its recorded SHA-256, and
    every weight finite. Returns the model info; PipelineError names what is wrong."""
    return _checked_model(train_dir)[0]


def _checked_model(train_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from vae.config import VAEConfig

    info = read_model_info(train_dir)
    path = Path(train_dir) / MODEL_DIR / MODEL_CONFIG_FILE
    try:
        VAEConfig.from_dict(info["architecture"])
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"{path}: invalid architecture ({exc})") from exc
    weights_path = Path(train_dir) / MODEL_DIR / MODEL_WEIGHTS_FILE
    if not weights_path.is_file():
        raise PipelineError(f"{train_dir}: {MODEL_DIR}/{MODEL_WEIGHTS_FILE} missing")
    if sha256_file(weights_path) != info["weights_sha256"]:
        raise PipelineError(f"{weights_path}: SHA-256 does not match {MODEL_CONFIG_FILE} (damaged or replaced)")
    weights = load_arrays(weights_path)
    bad = non_finite_arrays(weights)
    if bad:
        raise PipelineError(f"{weights_path}: {len(bad)} weight arrays hold NaN or Inf (diverged model)")
    return info, weights


def load_model(train_dir: Path):
    """Rebuild the trained VAE from TRAIN_DIR/model/ once `check_model_dir` passes;
    returns (model, info)."""
    from vae import VAEConfig, build_vae, set_state

    info, weights = _checked_model(train_dir)
    model = build_vae(VAEConfig.from_dict(info["architecture"]), seed=info.get("seed"))
    try:
        set_state(weights, model)
    except ValueError as exc:
        weights_path = Path(train_dir) / MODEL_DIR / MODEL_WEIGHTS_FILE
        raise PipelineError(f"{weights_path}: does not fit the stored architecture ({exc})") from exc
    return model, info
