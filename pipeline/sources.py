"""Where Fashion-MNIST comes from: local IDX files or tensorflow-datasets.

Fetching is kept apart from parsing (:mod:`pipeline.idx`): each loader returns
plain arrays per split plus a description of what it read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.idx import read_idx_gz, validate_split
from pipeline.schema import IDX_FILES, SPLITS

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
TFDS_BATCH = 10_000
KERAS_CACHE_DIR = Path("~/.keras/datasets/fashion-mnist").expanduser()


@dataclass
class SourceData:
    """Decoded arrays per split: images (N, 28, 28) uint8 and labels (N,) uint8."""

    kind: str  # "idx" or "tfds"
    location: str
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    file_sha256: dict[str, str] = field(default_factory=dict)


def candidate_idx_dirs() -> list[Path]:
    """Local directories searched by the `auto` source, in order."""
    dirs = []
    if os.environ.get("FASHION_MNIST_DIR"):
        dirs.append(Path(os.environ["FASHION_MNIST_DIR"]))
    return [*dirs, DEBIAN_DIR, KERAS_CACHE_DIR]


def has_idx_files(directory: Path) -> bool:
    return all((directory / name).is_file() for pair in IDX_FILES.values() for name in pair)


def resolve_source(spec: str) -> tuple[str, Path | None]:
    """Turn a source spec (`auto`, `tfds`, `idx:DIR`) into (`idx`, DIR) or (`tfds`, None)."""
    if spec.startswith("idx:"):
        return "idx", Path(spec[4:]).expanduser()
    if spec == "tfds":
        return "tfds", None
    if spec == "auto":
        for directory in candidate_idx_dirs():
            if has_idx_files(directory):
                return "idx", directory
        return "tfds", None
    raise PipelineError(f"unknown source {spec!r}: use auto, tfds or idx:DIR")


def load_idx_dir(directory: Path) -> SourceData:
    """Read and validate the four gzipped IDX files of `directory`."""
    if not directory.is_dir():
        raise PipelineError(f"{directory}: source directory not found")
    splits, hashes = {}, {}
    for split in SPLITS:
        image_name, label_name = IDX_FILES[split]
        images, hashes[image_name] = read_idx_gz(directory / image_name)
        labels, hashes[label_name] = read_idx_gz(directory / label_name)
        validate_split(images, labels, f"{directory}/{split}")
        splits[split] = (images, labels)
    return SourceData("idx", str(directory), splits, hashes)


def load_tfds(data_dir: str | None = None) -> SourceData:
    """Load `fashion_mnist` through tensorflow-datasets (downloads when online)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:  # pragma: no cover - the train extra brings it
        raise PipelineError("the tfds source needs tensorflow-datasets (pip install '.[train]')") from exc
    splits = {}
    try:
        builder = tfds.builder("fashion_mnist", data_dir=data_dir)
        builder.download_and_prepare()
        for split in SPLITS:
            # Fixed-size batches: batch_size=-1 aborts TensorFlow under tfds' mock data.
            batches = list(tfds.as_numpy(builder.as_dataset(split=split, batch_size=TFDS_BATCH, shuffle_files=False)))
            images = np.concatenate([b["image"] for b in batches]).astype(np.uint8).reshape(-1, 28, 28)
            labels = np.concatenate([b["label"] for b in batches]).astype(np.uint8)
            validate_split(images, labels, f"tfds fashion_mnist/{split}")
            splits[split] = (images, labels)
    except PipelineError:
        raise
    except Exception as exc:  # network and dataset errors come in many types
        raise PipelineError(f"tfds fashion_mnist: {str(exc).splitlines()[0]}") from exc
    return SourceData("tfds", f"tfds:fashion_mnist:{builder.version}", splits)


def load_source(spec: str) -> SourceData:
    kind, directory = resolve_source(spec)
    return load_idx_dir(directory) if kind == "idx" else load_tfds()
