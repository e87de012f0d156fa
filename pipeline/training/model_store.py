"""Reading and writing model state: training checkpoints and the final model directory.

The model is always stored in Keras's native format, `vae.keras`, which
`keras.saving.load_model` opens once `vae.model` is imported; its weights are matched by
layer name, never by position. A checkpoint directory holds `vae.keras`, the optimizer
variables keyed by their paths (`optimizer.npz`, see `vae.state`) and
`checkpoint.json` (epoch, config, metrics history). The final model directory,
TRAIN_DIR/model/, holds the last checkpoint's `vae.keras` and `model.json` (the
architecture, the training facts and the SHA-256 of `vae.keras`).

Every check here reads the files with zipfile, h5py and numpy, without Keras, so a
damaged or diverged model is refused in milliseconds, before Ray or TensorFlow start.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from deploy.artifact import sha256_file
from pipeline.errors import PipelineError
from pipeline.files import atomic_directory, read_json, write_json
from pipeline.schema import (
    CHECKPOINT_PREFIX,
    LEGACY_WEIGHTS_FILE,
    MODEL_CONFIG_FILE,
    MODEL_DIR,
    MODEL_FILE,
)
from pipeline.storage import Store

OPTIMIZER_FILE = "optimizer.npz"
CHECKPOINT_INFO_FILE = "checkpoint.json"
LEGACY_STATE_FILE = "state.npz"  # checkpoints before the .keras format
KERAS_CONFIG = "config.json"  # inside a .keras file
KERAS_WEIGHTS = "model.weights.h5"
REGISTERED_NAME = "vae>VAE"
UPGRADE_COMMAND = "vae-pipeline upgrade-model"


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
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
        key for key, value in arrays.items() if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()
    )


def read_keras_file(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The model config and every weight array of a `.keras` file, read without Keras;
    weights are keyed by their place in the file (`layers/.../vars/0`)."""
    import h5py

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read(KERAS_CONFIG))
            weights_bytes = archive.read(KERAS_WEIGHTS)
        arrays: dict[str, np.ndarray] = {}
        with h5py.File(io.BytesIO(weights_bytes), "r") as weights:
            weights.visititems(
                lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None
            )
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise PipelineError(f"{path}: unreadable Keras model file ({str(exc).splitlines()[0]})") from exc
    return config, arrays


def check_keras_file(path: Path, architecture: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `.keras` file holding a VAE (of `architecture`, when given) whose weights are all
    finite; returns the architecture it holds."""
    config, weights = read_keras_file(path)
    registered = config.get("registered_name") if isinstance(config, dict) else None
    if registered != REGISTERED_NAME:
        raise PipelineError(f"{path}: not a vae.VAE model (registered name {registered!r})")
    stored = (config.get("config") or {}).get("config")
    if architecture is not None and stored != architecture:
        raise PipelineError(f"{path}: holds another architecture than {MODEL_CONFIG_FILE} records")
    bad = non_finite_arrays(weights)
    if bad:
        raise PipelineError(f"{path}: {len(bad)} weight arrays hold NaN or Inf, e.g. {bad[0]} (diverged model)")
    return stored


def write_checkpoint(directory: Path, model, optimizer, info: dict[str, Any]) -> None:
    """The model as `vae.keras`, the optimizer's variables by path, and `info`."""
    from vae import get_state

    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    save_arrays(directory / OPTIMIZER_FILE, get_state(optimizer=optimizer))
    write_json(directory / CHECKPOINT_INFO_FILE, info)


def read_checkpoint_info(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    info_path = directory / CHECKPOINT_INFO_FILE
    if not info_path.is_file():
        raise PipelineError(f"{directory}: not a training checkpoint (no {CHECKPOINT_INFO_FILE})")
    if (directory / LEGACY_STATE_FILE).exists() and not (directory / MODEL_FILE).exists():
        raise PipelineError(
            f"{directory}: a checkpoint of an older vae-pipeline ({LEGACY_STATE_FILE}); "
            "it cannot be resumed: train from the start"
        )
    return read_json(info_path)


def check_checkpoint(directory: Path) -> dict[str, Any]:
    """A checkpoint to resume from: readable, and every model and optimizer value finite.
    Returns its info."""
    info = read_checkpoint_info(directory)
    check_keras_file(Path(directory) / MODEL_FILE)
    bad = non_finite_arrays(load_arrays(Path(directory) / OPTIMIZER_FILE))
    if bad:
        raise PipelineError(f"{directory}: checkpoint holds NaN or Inf ({bad[0]}); cannot resume from it")
    return info


def restore_checkpoint(directory: Path, model, optimizer) -> dict[str, Any]:
    """Load a checkpoint into a built model and optimizer; returns its info."""
    from vae import set_state

    directory = Path(directory)
    info = check_checkpoint(directory)
    model.load_weights(directory / MODEL_FILE)
    set_state(load_arrays(directory / OPTIMIZER_FILE), optimizer=optimizer)
    return info


def find_latest_checkpoint(storage: str) -> str | None:
    """The newest `checkpoint_epoch_NNNN` directory under `storage` (path or URI): the
    highest epoch, and of two with the same epoch the later Ray Train run (run names
    hold their start time)."""
    store = Store.open(storage)
    found = set()
    for name in store.list_files():
        parts = name.split("/")
        for depth, part in enumerate(parts[:-1]):
            epoch = checkpoint_epoch(part)
            if epoch >= 0:
                found.add((epoch, "/".join(parts[: depth + 1])))
    return store.uri(max(found)[1]) if found else None


def checkpoint_epoch(location: str) -> int:
    """The epoch in a `checkpoint_epoch_NNNN` path's last part; -1 for any other name."""
    name = location.rstrip("/").rsplit("/", 1)[-1]
    suffix = name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else -1


def write_model_dir(train_dir: Path, checkpoint: Path, info: dict[str, Any]) -> Path:
    """Write TRAIN_DIR/model/ atomically from the final checkpoint's `vae.keras`; `info`
    must hold the `architecture` dict.

    Refuses (PipelineError) weights that hold a NaN or an infinity: a diverged model is
    never written as a trained one.
    """
    if "architecture" not in info:
        raise ValueError("model info needs an 'architecture' entry")
    source = Path(checkpoint) / MODEL_FILE
    check_keras_file(source, info["architecture"])
    target = Path(train_dir) / MODEL_DIR
    with atomic_directory(target) as tmp:
        shutil.copyfile(source, tmp / MODEL_FILE)
        write_json(tmp / MODEL_CONFIG_FILE, {**info, "model_sha256": sha256_file(tmp / MODEL_FILE)})
    return target


def read_model_info(train_dir: Path) -> dict[str, Any]:
    """TRAIN_DIR/model/model.json, with the fields every reader needs checked."""
    directory = Path(train_dir) / MODEL_DIR
    path = directory / MODEL_CONFIG_FILE
    if not path.is_file():
        raise PipelineError(f"{train_dir}: no trained model ({MODEL_DIR}/{MODEL_CONFIG_FILE} missing)")
    if (directory / LEGACY_WEIGHTS_FILE).exists() and not (directory / MODEL_FILE).exists():
        raise PipelineError(
            f"{directory}: holds {LEGACY_WEIGHTS_FILE}, the model format before vae-pipeline 0.2; "
            f"convert it with `{UPGRADE_COMMAND} {train_dir}`"
        )
    info = read_json(path)
    if not isinstance(info, dict) or not isinstance(info.get("architecture"), dict):
        raise PipelineError(f"{path}: not a model description (no architecture)")
    if not isinstance(info.get("model_sha256"), str):
        raise PipelineError(f"{path}: records no model_sha256; train again")
    return info


def check_model_dir(train_dir: Path) -> dict[str, Any]:
    """Check TRAIN_DIR/model/ without building the model: model.json readable, an
    architecture the model accepts, vae.keras matching its recorded SHA-256 and
    architecture, and every weight finite. Returns the model info; PipelineError names
    what is wrong."""
    from vae.config import VAEConfig

    info = read_model_info(train_dir)
    path = Path(train_dir) / MODEL_DIR / MODEL_CONFIG_FILE
    try:
        VAEConfig.from_dict(info["architecture"])
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"{path}: invalid architecture ({exc})") from exc
    model_path = Path(train_dir) / MODEL_DIR / MODEL_FILE
    if not model_path.is_file():
        raise PipelineError(f"{train_dir}: {MODEL_DIR}/{MODEL_FILE} missing")
    if sha256_file(model_path) != info["model_sha256"]:
        raise PipelineError(f"{model_path}: SHA-256 does not match {MODEL_CONFIG_FILE} (damaged or replaced)")
    check_keras_file(model_path, info["architecture"])
    return info


def load_model(train_dir: Path):
    """The trained VAE of TRAIN_DIR/model/ (opened with `keras.saving.load_model` once
    `check_model_dir` passes); returns (model, info)."""
    import keras

    from vae.model import VAE  # registers the model's classes with Keras

    info = check_model_dir(train_dir)
    path = Path(train_dir) / MODEL_DIR / MODEL_FILE
    try:
        model = keras.saving.load_model(path, compile=False)
    except (ValueError, TypeError, OSError) as exc:
        raise PipelineError(f"{path}: Keras cannot load it ({str(exc).splitlines()[0]})") from exc
    if not isinstance(model, VAE):
        raise PipelineError(f"{path}: holds a {type(model).__name__}, not a vae.VAE")
    return model, info


def model_files(train_dir: Path) -> dict[str, bytes]:
    """TRAIN_DIR/model/'s files by name, checked first: what a Ray actor on another node
    (which cannot see this machine's disk) rebuilds the model from."""
    check_model_dir(train_dir)
    directory = Path(train_dir) / MODEL_DIR
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def load_model_from_files(files: dict[str, bytes]):
    """The model from `model_files`' output, through a temporary TRAIN_DIR; (model, info)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vae-model-") as tmp:
        (Path(tmp) / MODEL_DIR).mkdir()
        for name, data in files.items():
            (Path(tmp) / MODEL_DIR / Path(name).name).write_bytes(data)
        return load_model(Path(tmp))


def upgrade_model_dir(train_dir: Path) -> Path:
    """Convert a TRAIN_DIR/model/ of the older format (`weights.npz`, weights listed in the
    order the model creates its variables) to `vae.keras`, checked against the recorded
    SHA-256; the rest of model.json is kept. Returns the model directory."""
    import tempfile

    from vae import VAEConfig, build_vae

    directory = Path(train_dir) / MODEL_DIR
    weights_path, info_path = directory / LEGACY_WEIGHTS_FILE, directory / MODEL_CONFIG_FILE
    if (directory / MODEL_FILE).exists() or not weights_path.is_file():
        raise PipelineError(
            f"{directory}: holds no model of the older format ({LEGACY_WEIGHTS_FILE}); nothing to upgrade"
        )
    info = read_json(info_path)
    recorded = info.get("weights_sha256") if isinstance(info, dict) else None
    if recorded is not None and sha256_file(weights_path) != recorded:
        raise PipelineError(f"{weights_path}: SHA-256 does not match {MODEL_CONFIG_FILE} (damaged or replaced)")
    weights = load_arrays(weights_path)
    bad = non_finite_arrays(weights)
    if bad:
        raise PipelineError(f"{weights_path}: {len(bad)} weight arrays hold NaN or Inf (diverged model)")
    model = build_vae(VAEConfig.from_dict(info["architecture"]), seed=info.get("seed"))
    ordered = [weights[f"model/{i}"] for i in range(len(weights)) if f"model/{i}" in weights]
    shapes = [tuple(v.shape) for v in model.variables]
    if len(ordered) != len(weights) or [a.shape for a in ordered] != shapes:
        raise PipelineError(f"{weights_path}: does not fit the architecture in {MODEL_CONFIG_FILE}")
    for variable, value in zip(model.variables, ordered, strict=True):
        variable.assign(value)
    with tempfile.TemporaryDirectory(prefix="vae-upgrade-") as scratch:
        model.save(Path(scratch) / MODEL_FILE)
        info = {key: value for key, value in info.items() if key != "weights_sha256"}
        return write_model_dir(train_dir, Path(scratch), info)
