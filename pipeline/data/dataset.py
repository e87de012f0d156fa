"""The ingested dataset's format, and reading it back checked against its manifest.

A dataset directory holds `train/` and `test/` Parquet files and `manifest.json`, which
lists every file with its size and row count and a SHA-256 of the decoded content.
`check_dataset` compares the two before a stage spends time on the data: the cheap
checks (file names, sizes, Parquet footers, row counts, schema) always, and with
`full=True` the content hash and class counts recomputed from the files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, DataConfig
from pipeline.errors import PipelineError
from pipeline.schema import (
    CLASS_NAMES,
    COLUMN_ID,
    COLUMN_IMAGE,
    COLUMN_LABEL,
    DATASET_FORMAT,
    IMAGE_SHAPE,
    MANIFEST_FILE,
    NUM_CLASSES,
    SPLITS,
)

HASH_ROWS = 10_000  # images hashed per step


def parquet_schema():
    import pyarrow as pa

    metadata = {
        "class_names": json.dumps(CLASS_NAMES),
        "image_shape": json.dumps(IMAGE_SHAPE),
        "image_layout": "row-major uint8, 0=background 255=ink",
    }
    return pa.schema(
        [
            pa.field(COLUMN_ID, pa.int64(), nullable=False),
            pa.field(COLUMN_IMAGE, pa.fixed_shape_tensor(pa.uint8(), IMAGE_SHAPE), nullable=False),
            pa.field(COLUMN_LABEL, pa.uint8(), nullable=False),
        ],
        metadata=metadata,
    )


def content_sha256(splits: dict[str, tuple[Any, np.ndarray]]) -> str:
    """A hash of the decoded data, the same whatever the source or file layout.

    `splits` maps each split to (images, labels); images may be an array (N, 28, 28)
    uint8, a ProgressiveArray still being decoded (hashed block by block as its rows
    arrive), or an iterable of consecutive image blocks (one per Parquet file, say): the
    digest is over the bytes, so where the blocks split makes no difference.
    """
    digest = hashlib.sha256()
    for split in SPLITS:
        images, labels = splits[split]
        digest.update(split.encode())
        for block in _image_blocks(images, len(labels)):
            digest.update(np.ascontiguousarray(block))
        digest.update(np.ascontiguousarray(labels, dtype=np.uint8))
    return digest.hexdigest()


def _image_blocks(images: Any, rows: int):
    if not (isinstance(images, np.ndarray) or hasattr(images, "rows")):
        yield from images
        return
    for start in range(0, rows, HASH_ROWS):
        stop = min(start + HASH_ROWS, rows)
        yield images.rows(stop)[start:] if hasattr(images, "rows") else images[start:stop]


def read_manifest(directory: Path) -> dict[str, Any]:
    """The dataset's manifest, with its format and fields checked."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise PipelineError(f"{directory}: not an ingested dataset (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable manifest ({str(exc).splitlines()[0]})") from exc
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != DATASET_FORMAT:
        raise PipelineError(f"{path}: manifest format {found!r}, expected {DATASET_FORMAT!r}; ingest the data again")
    try:
        _check_manifest_fields(manifest)
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f"{path}: malformed manifest ({exc!r})") from exc
    return manifest


def _check_manifest_fields(manifest: dict[str, Any]) -> None:
    digest = manifest["content_sha256"]
    if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef")):
        raise ValueError("content_sha256 is not a SHA-256 hex digest")
    for split in SPLITS:
        int(manifest["rows"][split])
        for entry in manifest["files"][split]:
            str(entry["name"]), int(entry["rows"]), int(entry["bytes"])
    dataset_data_config(manifest)


def check_dataset(directory: Path, full: bool = False) -> dict[str, Any]:
    """Check the dataset at `directory` against its manifest; returns the manifest.

    Raises PipelineError naming the first file or number that disagrees. `full` also
    decodes every image and recomputes the content hash and class counts (about a
    second for all of Fashion-MNIST).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    for split in SPLITS:
        _check_split_files(directory, split, manifest)
    if full:
        _check_content(directory, manifest)
    return manifest


def _check_split_files(directory: Path, split: str, manifest: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    split_dir = directory / split
    listed = manifest["files"][split]
    present = sorted(p.name for p in split_dir.iterdir()) if split_dir.is_dir() else []
    missing = [entry["name"] for entry in listed if entry["name"] not in present]
    if missing:
        raise PipelineError(f"{split_dir / missing[0]}: listed in the manifest but missing")
    extra = sorted(set(present) - {entry["name"] for entry in listed})
    if extra:
        raise PipelineError(f"{split_dir / extra[0]}: not listed in the manifest; remove it or ingest again")
    expected = parquet_schema()
    total = 0
    for entry in listed:
        path = split_dir / entry["name"]
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise PipelineError(
                f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced); ingest again"
            )
        try:
            metadata, schema = pq.read_metadata(path), pq.read_schema(path)
        except (pa.ArrowException, OSError) as exc:
            raise PipelineError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from exc
        if metadata.num_rows != entry["rows"]:
            raise PipelineError(f"{path}: {metadata.num_rows} rows, the manifest says {entry['rows']}")
        if [(f.name, str(f.type)) for f in schema] != [(f.name, str(f.type)) for f in expected]:
            raise PipelineError(f"{path}: schema {schema.types} is not the dataset's {expected.types}")
        total += metadata.num_rows
    if total != manifest["rows"][split]:
        raise PipelineError(f"{split_dir}: its files hold {total} rows, the manifest says {manifest['rows'][split]}")


def _check_content(directory: Path, manifest: dict[str, Any]) -> None:
    """Recompute the class counts and the content hash one file at a time, in the order
    `read_split` reads them, so that memory holds one file's images, never a split's."""
    splits = {}
    for split in SPLITS:
        paths = [directory / split / name for name in sorted(entry["name"] for entry in manifest["files"][split])]
        labels = [_read_columns(path, [COLUMN_LABEL]).column(COLUMN_LABEL).to_numpy() for path in paths]
        labels = np.concatenate(labels) if labels else np.zeros(0, np.uint8)
        counts = np.bincount(labels, minlength=NUM_CLASSES).tolist()
        if counts != manifest["class_counts"][split]:
            raise PipelineError(f"{directory}: {split} class counts {counts} differ from the manifest's")
        blocks = (images_from_column(_read_columns(path, [COLUMN_IMAGE]).column(COLUMN_IMAGE)) for path in paths)
        splits[split] = (blocks, labels)
    digest = content_sha256(splits)
    if digest != manifest["content_sha256"]:
        raise PipelineError(
            f"{directory}: content hash {digest[:12]}... differs from the manifest's "
            f"{manifest['content_sha256'][:12]}... (data or manifest changed after ingest); ingest again"
        )


def _read_columns(path: Path, columns: list[str]):
    """A Parquet file or directory's `columns` as a pyarrow Table; PipelineError if unreadable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise PipelineError(f"{path}: unreadable Parquet data ({str(exc).splitlines()[0]})") from exc


def read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a split back with pyarrow: images (N, 28, 28) uint8, labels (N,) uint8."""
    path = Path(directory) / split
    if not path.is_dir():
        raise PipelineError(f"{directory}: no {split}/ split (run ingest first)")
    table = _read_columns(path, [COLUMN_IMAGE, COLUMN_LABEL])
    return images_from_column(table.column(COLUMN_IMAGE)), table.column(COLUMN_LABEL).to_numpy()


def images_from_column(column) -> np.ndarray:
    """A fixed_shape_tensor image column -> (N, 28, 28) uint8, without per-row decoding."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    images = column.to_numpy_ndarray()
    if images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
        raise PipelineError(f"image column holds {images.dtype} {images.shape[1:]}, expected uint8 {IMAGE_SHAPE}")
    return images


def dataset_data_config(manifest: dict[str, Any]) -> DataConfig:
    """The data section the dataset was ingested with, validated like any config."""
    return Config.from_dict({"data": manifest["data"]}).data


def with_dataset_section(config: Config, manifest: dict[str, Any], directory: Path) -> Config:
    """`config` with its data section replaced by the one the dataset was ingested with,
    so that what a stage records is what applied. An explicitly set `data.limit` that
    differs from the dataset's is an error, not silently ignored."""
    ingested = dataset_data_config(manifest)
    if config.data.limit is not None and config.data.limit != ingested.limit:
        raise PipelineError(
            f"data.limit is {config.data.limit}, but {directory} was ingested with limit {ingested.limit}: "
            "ingest again with that limit, or leave data.limit unset"
        )
    return config.replace(data=ingested)
