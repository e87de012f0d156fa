"""A grid of images written as one greyscale PNG, band by band (standard library + numpy).

The grid is streamed: each row of tiles is rendered, compressed and written as soon as
its images arrive, so memory holds one band and one batch, whatever the image count.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from typing import BinaryIO

import numpy as np

from deploy.artifact import IMAGE_SHAPE

CELL = IMAGE_SHAPE[0] + 2  # an image tile plus a 1-pixel white gutter on each side
SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, columns) of the grid for `count` images: ceil(sqrt(count)) columns."""
    columns = int(np.ceil(np.sqrt(count)))
    return -(-count // columns), columns


def band(images: np.ndarray, columns: int) -> np.ndarray:
    """One row of the grid: up to `columns` images (k, 28, 28, 1) in [0, 1] -> (30, columns * 30)
    uint8, ink dark on white."""
    canvas = np.full((CELL, columns * CELL), 255, np.uint8)
    tiles = (255 - np.round(images[..., 0] * 255)).astype(np.uint8)  # (k, 28, 28)
    for index, tile in enumerate(tiles):
        canvas[1 : CELL - 1, index * CELL + 1 : (index + 1) * CELL - 1] = tile
    return canvas


def write_grid(handle: BinaryIO, batches: Iterable[np.ndarray], count: int) -> None:
    """Write `count` images, arriving in `batches` of (k, 28, 28, 1) in [0, 1], as a PNG grid.

    Raises ValueError if the batches hold a different number of images.
    """
    rows, columns = grid_shape(count)
    handle.write(SIGNATURE)
    handle.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", columns * CELL, rows * CELL, 8, 0, 0, 0, 0)))
    compressor = zlib.compressobj(9)
    pending: list[np.ndarray] = []
    written = 0

    def emit(images: np.ndarray) -> None:
        pixels = band(images, columns)
        # Every scanline starts with its filter type, 0 (none).
        raw = np.hstack([np.zeros((CELL, 1), np.uint8), pixels]).tobytes()
        data = compressor.compress(raw)
        if data:
            handle.write(_chunk(b"IDAT", data))

    for batch in batches:
        pending.append(batch)
        held = sum(len(part) for part in pending)
        while held >= columns:
            joined = np.concatenate(pending)
            emit(joined[:columns])
            written += columns
            pending, held = [joined[columns:]], held - columns
    rest = np.concatenate(pending) if pending else np.zeros((0, *IMAGE_SHAPE), np.float32)
    if len(rest):
        emit(rest)
        written += len(rest)
    if written != count:
        raise ValueError(f"expected {count} images, got {written}")
    handle.write(_chunk(b"IDAT", compressor.flush()))
    handle.write(_chunk(b"IEND", b""))
