"""Ingest stage: Fashion-MNIST -> validated, sharded Parquet dataset + manifest.

Output contract (DIR):
    DIR/train/part-00000.parquet ...  DIR/test/part-00000.parquet ...
    DIR/manifest.json                 DIR/config.json
Columns: `id` int64 (index in the source's original order), `image` Arrow's
canonical fixed_shape_tensor<uint8, [28, 28]> (row-major), `label` uint8 (0-9);
zstd-compressed. pyarrow and Ray Data both read `image` back as (N, 28, 28) uint8.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.config import Config
from pipeline.data.dataset import check_dataset, content_sha256, parquet_schema
from pipeline.data.progressive import ProgressiveArray
from pipeline.data.sources import SourceData, load_source
from pipeline.errors import PipelineError
from pipeline.files import write_json
from pipeline.outputs import check_output, stage_output
from pipeline.schema import (
    CLASS_NAMES,
    COLUMN_IMAGE,
    COLUMN_LABEL,
    CONFIG_FILE,
    DATASET_FORMAT,
    FULL_SPLIT_ROWS,
    IMAGE_SHAPE,
    MANIFEST_FILE,
    NUM_CLASSES,
    SPLITS,
)
from pipeline.stages import StageRun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    out: Path
    manifest: dict[str, Any]
    skipped: bool  # True when an identical dataset was already there


Splits = dict[str, tuple[ProgressiveArray, np.ndarray]]  # split -> (images, labels)


def select(source: SourceData, limit: int | None) -> Splits:
    """Apply `limit` to the labels (a split has len(labels) rows; its images may hold
    more), or without one require the complete dataset's counts."""
    chosen = {}
    for split in SPLITS:
        images, labels = source.splits[split]
        if limit is None:
            check_full_counts(split, labels, source.location)
        chosen[split] = (images, labels[:limit])
    return chosen


def check_full_counts(split: str, labels: np.ndarray, location: str) -> None:
    """Without a limit the data must be all of Fashion-MNIST: 60,000/10,000 rows, balanced."""
    expected = FULL_SPLIT_ROWS[split]
    if len(labels) != expected:
        raise PipelineError(
            f"{location}: {split} split has {len(labels)} rows, expected {expected} (pass --limit to ingest a subset)"
        )
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if not np.all(counts == expected // NUM_CLASSES):
        raise PipelineError(f"{location}: {split} class counts {counts.tolist()} are not balanced")


def write_file(path: Path, ids: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
    """One Parquet file of the dataset's schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema()
    pixels = pa.array(np.ascontiguousarray(images, dtype=np.uint8).reshape(-1))  # zero-copy
    image_type = schema.field(COLUMN_IMAGE).type
    table = pa.table(
        [
            pa.array(ids, type=pa.int64()),
            pa.ExtensionArray.from_storage(
                image_type,
                pa.FixedSizeListArray.from_arrays(pixels, image_type.storage_type.list_size),
            ),
            pa.array(labels, type=pa.uint8()),
        ],
        schema=schema,
    )
    # Parquet stores each uint8 pixel as an INT32. BYTE_STREAM_SPLIT puts the always-zero
    # high bytes in their own streams, so zstd skips through them: ~40% faster writes and
    # ~30% smaller files than PLAIN. No dictionary for pixels (halves the write time).
    pq.write_table(
        table,
        path,
        compression="zstd",
        compression_level=-3,
        use_dictionary=[COLUMN_LABEL],
        column_encoding={f"{COLUMN_IMAGE}.list.element": "BYTE_STREAM_SPLIT"},
    )


def write_part(path: Path, images: ProgressiveArray, labels: np.ndarray, start: int, stop: int) -> None:
    """Rows [start, stop) of a split as one Parquet file, once those rows are decoded."""
    write_file(path, np.arange(start, stop), images.rows(stop)[start:], labels[start:stop])


def write_splits(directory: Path, splits: Splits, rows_per_file: int, pool: Executor) -> dict[str, list]:
    """Write every split as numbered Parquet files on `pool` (pyarrow releases the GIL
    while encoding), each file as soon as its rows are decoded; returns, per split, each
    file's name, rows and size for the manifest. Returns or raises only once every
    write has stopped."""
    jobs, files = [], {}
    # Smaller splits first: their files finish decoding first, so no writer idles.
    for split in sorted(SPLITS, key=lambda name: len(splits[name][1])):
        images, labels = splits[split]
        (directory / split).mkdir(parents=True)
        files[split] = []
        for index in range(max(1, -(-len(labels) // rows_per_file))):
            start, stop = index * rows_per_file, min((index + 1) * rows_per_file, len(labels))
            path = directory / split / f"part-{index:05d}.parquet"
            files[split].append({"name": path.name, "rows": stop - start})
            jobs.append(pool.submit(write_part, path, images, labels, start, stop))
    wait(jobs)
    for job in jobs:
        job.result()
    for split, entries in files.items():
        for entry in entries:
            entry["bytes"] = (directory / split / entry["name"]).stat().st_size
    return {split: files[split] for split in SPLITS}


def build_manifest(
    source: SourceData,
    splits: Splits,
    digest: str,
    config: Config,
    files: dict,
) -> dict[str, Any]:
    import pyarrow as pa

    schema = parquet_schema()
    return {
        "format": DATASET_FORMAT,
        "content_sha256": digest,
        "rows": {split: int(len(splits[split][1])) for split in SPLITS},
        "class_counts": {split: np.bincount(splits[split][1], minlength=NUM_CLASSES).tolist() for split in SPLITS},
        "class_names": list(CLASS_NAMES),
        "image_shape": list(IMAGE_SHAPE),
        "schema": {field.name: str(field.type) for field in schema},
        "files": files,
        "data": dataclasses.asdict(config.data),
        "source": {"kind": source.kind, "location": source.location, "sha256": source.file_sha256()},
        "versions": {
            "pipeline": __version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pyarrow": pa.__version__,
        },
    }


def ingest(config: Config, out: Path, force: bool = False) -> IngestResult:
    """Run the ingest stage; nothing is written unless the whole dataset validates.

    `out` must be new, empty, or an earlier ingest output (see pipeline.outputs).
    Decoding, hashing and Parquet writing overlap: files are written into a temporary
    directory as their rows are decoded, and it replaces `out` only once every file,
    the content hash and the source's gzip checksums are good.
    """
    out = Path(out)
    existing = check_output(out, "ingest")
    workers = os.cpu_count() or 1
    # The hash gets its own thread: it waits on decoding, and must not hold a pool slot.
    with ThreadPoolExecutor(workers, "ingest") as pool, ThreadPoolExecutor(1, "ingest-hash") as hasher:
        source = load_source(config.data.source, pool)
        log.info("ingest: source %s (%s)", source.kind, source.location)
        splits = select(source, config.data.limit)
        digest = hasher.submit(content_sha256, splits)
        if existing and not force:
            old = unchanged_dataset(out, digest.result(), config)
            if old is not None:
                source.file_sha256()  # raises if any file fails its gzip checks
                log.info("ingest: %s already holds this data (sha256 %s); nothing to do", out, digest.result()[:12])
                return IngestResult(out, old, skipped=True)
        with stage_output(out, "ingest") as tmp:
            files = write_splits(tmp, splits, config.data.rows_per_file, pool)
            manifest = build_manifest(source, splits, digest.result(), config, files)
            write_json(tmp / MANIFEST_FILE, manifest)
            write_json(tmp / CONFIG_FILE, config.to_dict())
    log.info("ingest: wrote %s (%d train / %d test rows)", out, manifest["rows"]["train"], manifest["rows"]["test"])
    return IngestResult(out, manifest, skipped=False)


def unchanged_dataset(out: Path, digest: str, config: Config) -> dict[str, Any] | None:
    """The manifest of the earlier ingest output at `out` when it holds this very data,
    laid out the same way, and its files still match the manifest; else None."""
    try:
        old = check_dataset(out)
    except PipelineError as exc:
        log.warning("ingest: rewriting the earlier output: %s", exc)
        return None
    same = old["content_sha256"] == digest and old["data"]["rows_per_file"] == config.data.rows_per_file
    return old if same else None


def run_in(run: StageRun) -> None:
    """The stage inside a run: always rebuilt when the run loop calls it (its key changed,
    or its output is damaged)."""
    ingest(run.config, run.directory("ingest"), force=True)


def check_done(directory: Path) -> None:
    """The dataset still matches its manifest, content hash included."""
    check_dataset(directory, full=True)
