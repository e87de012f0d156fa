"""Parsing and validating the original gzipped IDX files (pure functions + one streaming reader)."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.data.progressive import ProgressiveArray
from pipeline.errors import PipelineError
from pipeline.schema import IMAGE_SHAPE, NUM_CLASSES

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
INFLATE_STEP = 1 << 20  # compressed bytes per zlib call: ~1.8 MB, ~2,300 images, decoded


def parse_header(data: bytes, name: str) -> tuple[tuple[int, ...], int] | None:
    """The dimensions and header length of an (uncompressed) IDX byte string.

    Checks the magic number (unsigned-byte type, 1 or 3 dimensions). Returns None when
    `data` is too short to hold the whole header yet. `name` is used in errors.
    """
    if len(data) < 4:
        return None
    (magic,) = struct.unpack(">I", data[:4])
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise PipelineError(f"{name}: wrong IDX magic number 0x{magic:08x}")
    header = 4 + 4 * (magic & 0xFF)
    if len(data) < header:
        return None
    return struct.unpack(f">{magic & 0xFF}I", data[4:header]), header


def inflate_idx_gz(path: Path, target: ProgressiveArray) -> str:
    """Decompress one gzipped IDX file straight into `target`, publishing rows as they
    are decoded; returns the SHA-256 of the compressed file.

    The file is read from disk once; zlib checks the gzip header, CRC and length. Any
    problem is a PipelineError naming the file, raised here and handed to `target`'s
    readers, so that none of them waits forever.
    """
    try:
        digest = _inflate(Path(path), target)
    except BaseException as exc:
        target.fail(exc)
        raise
    target.finish()
    return digest


def _inflate(path: Path, target: ProgressiveArray) -> str:
    name = str(path)
    if not path.is_file():
        raise PipelineError(f"{name}: file not found")
    raw = path.read_bytes()
    head, flat, total, row_bytes = b"", None, 0, 1  # total: payload bytes decoded so far
    try:
        for chunk in _gunzip_chunks(raw):
            if flat is None:  # still collecting the header
                head += chunk
                parsed = parse_header(head, name)
                if parsed is None:
                    continue
                dims, header = parsed
                flat = np.empty(int(np.prod(dims)), dtype=np.uint8)
                row_bytes = int(np.prod(dims[1:]))
                target.start(flat.reshape(dims))
                chunk = head[header:]
            total += len(chunk)
            if total <= len(flat):  # beyond it the file is too long: reported below
                flat[total - len(chunk) : total] = np.frombuffer(chunk, dtype=np.uint8)
                target.advance(total // row_bytes)
    except (zlib.error, EOFError) as exc:
        raise PipelineError(f"{name}: corrupt or truncated gzip ({exc})") from exc
    if flat is None:
        raise PipelineError(f"{name}: truncated IDX header ({len(head)} bytes)")
    if total != len(flat):
        raise PipelineError(f"{name}: payload is {total} bytes, header says {len(flat)}")
    return hashlib.sha256(raw).hexdigest()


def _gunzip_chunks(raw: bytes):
    """Decompressed pieces of a one-member gzip stream, INFLATE_STEP input bytes at a time."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and trailer
    view = memoryview(raw)
    for start in range(0, len(raw), INFLATE_STEP):
        yield inflater.decompress(view[start : start + INFLATE_STEP])
    yield inflater.flush()
    if not inflater.eof:
        raise EOFError("the stream ends before its end marker")
    if inflater.unused_data.strip(b"\0"):
        raise EOFError("data after the end of the stream")


def validate_split(images: np.ndarray | ProgressiveArray, labels: np.ndarray, name: str) -> None:
    """Images (N, 28, 28) uint8 and labels (N,) in 0-9 that agree in count."""
    shape = images.shape  # a ProgressiveArray knows its shape before its rows
    if len(shape) != 3 or shape[1:] != IMAGE_SHAPE:
        raise PipelineError(f"{name}: images have shape {shape}, expected (N, {', '.join(map(str, IMAGE_SHAPE))})")
    if labels.ndim != 1:
        raise PipelineError(f"{name}: labels have shape {labels.shape}, expected (N,)")
    if shape[0] != len(labels):
        raise PipelineError(f"{name}: {shape[0]} images but {len(labels)} labels")
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise PipelineError(f"{name}: label {int(labels.max())} outside 0-{NUM_CLASSES - 1}")
