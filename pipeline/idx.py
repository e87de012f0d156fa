"""Parsing and validating the original gzipped IDX files (pure functions + one reader)."""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.schema import IMAGE_SHAPE, NUM_CLASSES

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Decode an (uncompressed) IDX byte string into a uint8 array.

    Checks the magic number (unsigned-byte type, 1 or 3 dimensions) and that the
    payload length matches the header's dimensions. `name` is used in errors.
    """
    if len(data) < 8:
        raise PipelineError(f"{name}: truncated IDX header ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise PipelineError(f"{name}: wrong IDX magic number 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise PipelineError(f"{name}: truncated IDX header ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise PipelineError(
            f"{name}: payload is {len(data) - header} bytes, header says {expected - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_gz(path: Path) -> tuple[np.ndarray, str]:
    """Read and decode one gzipped IDX file, reading it from disk once.

    Returns the array and the SHA-256 of the compressed file; any problem is a
    PipelineError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise PipelineError(f"{path}: corrupt or truncated gzip ({exc})") from exc
    return parse_idx(data, str(path)), hashlib.sha256(raw).hexdigest()


def validate_split(images: np.ndarray, labels: np.ndarray, name: str) -> None:
    """Images (N, 28, 28) uint8 and labels (N,) in 0-9 that agree in count."""
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise PipelineError(f"{name}: images have shape {images.shape}, expected (N, 28, 28)")
    if labels.ndim != 1:
        raise PipelineError(f"{name}: labels have shape {labels.shape}, expected (N,)")
    if len(images) != len(labels):
        raise PipelineError(f"{name}: {len(images)} images but {len(labels)} labels")
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise PipelineError(f"{name}: label {int(labels.max())} outside 0-{NUM_CLASSES - 1}")
