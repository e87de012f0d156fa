"""Where Fashion-MNIST comes from: local IDX files or tensorflow-datasets.

Fetching is kept apart from parsing (:mod:`pipeline.data.idx`): each loader returns
plain arrays per split plus a description of what it read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data.idx import inflate_idx_gz, validate_split
from pipeline.data.progressive import ProgressiveArray
from pipeline.errors import PipelineError
from pipeline.schema import IDX_FILES, IMAGE_SHAPE, SPLITS

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
TFDS_BATCH = 10_000
KERAS_CACHE_DIR = Path("~/.keras/datasets/fashion-mnist").expanduser()


@dataclass
class SourceData:
    """Per split: images (N, 28, 28) uint8, possibly still decoding, and labels (N,) uint8.

    Labels and the images' shape are known and validated when a loader returns; image
    rows may still be arriving (see ProgressiveArray).
    """

    kind: str  # "idx" or "tfds"
    location: str
    splits: dict[str, tuple[ProgressiveArray, np.ndarray]]
    file_jobs: dict[str, Future] = field(default_factory=dict)  # file name -> its SHA-256

    def file_sha256(self) -> dict[str, str]:
        """SHA-256 of each source file (waits for the files to be decoded)."""
        return {name: job.result() for name, job in self.file_jobs.items()}


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


def load_idx_dir(directory: Path, pool: Executor) -> SourceData:
    """Start decompressing the four gzipped IDX files of `directory` on `pool`; return
    once the labels and image headers are in and valid, while image rows keep arriving."""
    if not directory.is_dir():
        raise PipelineError(f"{directory}: source directory not found")
    names = [name for split in SPLITS for name in reversed(IDX_FILES[split])]  # labels first
    arrays = {name: ProgressiveArray() for name in names}
    jobs = {name: pool.submit(inflate_idx_gz, directory / name, arrays[name]) for name in names}
    splits = {}
    for split in SPLITS:  # in file order, so that the first bad file is the one reported
        image_name, label_name = IDX_FILES[split]
        images, labels = arrays[image_name], arrays[label_name].rows()
        validate_split(images, labels, f"{directory}/{split}")
        splits[split] = (images, labels)
    return SourceData("idx", str(directory), splits, jobs)


def load_tfds(data_dir: str | None = None) -> SourceData:
    """Load `fashion_mnist` through tensorflow-datasets (downloads on first use).

    The download honours the usual HTTP_PROXY / HTTPS_PROXY variables and checks every
    file against tfds' registered checksums. Its progress bars, retry warnings and
    printed notices are kept off the console (the stage logs its own lines); any
    failure is one PipelineError line.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:  # pragma: no cover - the train extra brings it
        raise PipelineError("the tfds source needs tensorflow-datasets (pip install '.[train]')") from exc
    splits = {}
    tfds.disable_progress_bar()
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # one warning per retry otherwise
    try:
        builder = tfds.builder("fashion_mnist", data_dir=data_dir)
        log.info("ingest: tensorflow-datasets fashion_mnist in %s (downloads on first use)", builder.data_dir)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            builder.download_and_prepare()
        log.debug("tfds: %s", printed.getvalue().strip())
        for split in SPLITS:
            # Fixed-size batches: batch_size=-1 aborts TensorFlow under tfds' mock data.
            batches = list(tfds.as_numpy(builder.as_dataset(split=split, batch_size=TFDS_BATCH, shuffle_files=False)))
            images = np.concatenate([b["image"] for b in batches]).astype(np.uint8).reshape(-1, *IMAGE_SHAPE)
            labels = np.concatenate([b["label"] for b in batches]).astype(np.uint8)
            validate_split(images, labels, f"tfds fashion_mnist/{split}")
            splits[split] = (ProgressiveArray.complete(images), labels)
    except PipelineError:
        raise
    except Exception as exc:  # network and dataset errors come in many types
        raise PipelineError(f"tfds fashion_mnist: {one_line(exc)}") from exc
    return SourceData("tfds", f"tfds:fashion_mnist:{builder.version}", splits)


def one_line(error: BaseException, limit: int = 400) -> str:
    """An exception's message with its line breaks and runs of spaces collapsed."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_source(spec: str, pool: Executor) -> SourceData:
    """Open the source `spec` names; IDX files are decompressed on `pool`."""
    kind, directory = resolve_source(spec)
    return load_idx_dir(directory, pool) if kind == "idx" else load_tfds()
