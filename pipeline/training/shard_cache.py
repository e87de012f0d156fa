"""A worker's shard of the training images: streamed from Ray Data in the first epoch,
then kept in memory and shuffled whole each later epoch (when it fits)."""

from __future__ import annotations

import numpy as np

from pipeline.schema import COLUMN_IMAGE, IMAGE_SHAPE

SHUFFLE_BUFFER_ROWS = 8192
# A worker keeps its shard in memory after the first epoch when it is at most this
# big (all of Fashion-MNIST is 47 MB); later epochs shuffle it fully and skip Ray Data.
CACHE_LIMIT_BYTES = 2 << 30


class ShardCache:
    """The worker's shard of the training images, gathered while the first epoch reads it."""

    def __init__(self, limit_bytes: int = CACHE_LIMIT_BYTES):
        self.parts: list[np.ndarray] = []
        self.bytes = 0
        self.limit = limit_bytes
        self.images: np.ndarray | None = None

    def add(self, images: np.ndarray) -> None:
        if self.parts is None:
            return
        self.bytes += images.nbytes
        if self.bytes > self.limit:
            self.parts = None  # too big: keep streaming from Ray Data every epoch
            return
        self.parts.append(images)

    def seal(self, min_rows: int) -> None:
        """End of the first epoch: keep the images if they cover a whole epoch."""
        if self.parts and sum(len(part) for part in self.parts) >= min_rows:
            self.images = np.concatenate(self.parts)
        self.parts = None

    def epoch_batches(self, batch: int, steps: int, seed: int):
        """`steps` batches of a fresh permutation of the cached images."""
        order = np.random.default_rng(seed).permutation(len(self.images))
        for step in range(steps):
            yield self.images[np.sort(order[step * batch : (step + 1) * batch])]


def chunked(batches, size: int):
    """Stack consecutive batches into arrays of up to `size` batches."""
    group = []
    for images in batches:
        group.append(images)
        if len(group) == size:
            yield np.stack(group)
            group = []
    if group:
        yield np.stack(group)


def streamed_batches(shard, batch: int, seed: int, cache: ShardCache):
    """Full batches of the Ray Data shard (local shuffle buffer); every row read,
    the last partial batch too, goes into `cache`."""
    pending = np.zeros((0, *IMAGE_SHAPE), np.uint8)
    for data in shard.iter_batches(
        batch_size=batch,
        batch_format="numpy",
        local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
        local_shuffle_seed=seed,
    ):
        images = data[COLUMN_IMAGE]
        cache.add(images)
        if len(images) == batch and not len(pending):
            yield images
            continue
        pending = np.concatenate([pending, images])
        while len(pending) >= batch:
            yield pending[:batch]
            pending = pending[batch:]
