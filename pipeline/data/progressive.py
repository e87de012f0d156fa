"""An array that one producer thread fills front to back while others read its first rows.

Ingest decompresses the 47 MB training images on one core and writes the first Parquet
files from them on the other while later rows are still inflating; this type is the
hand-off between the two.
"""

from __future__ import annotations

import threading

import numpy as np


class ProgressiveArray:
    """Rows become readable as the producer publishes them.

    Producer: `start(array)` once the shape is known, `advance(rows)` as rows are
    filled, then `finish()`, or `fail(exc)` on any error. Readers: `len()` waits for the
    shape, `rows(stop)` for the first `stop` rows; both raise the producer's error.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._array: np.ndarray | None = None
        self._ready = 0
        self._done = False
        self._error: BaseException | None = None

    @classmethod
    def complete(cls, array: np.ndarray) -> ProgressiveArray:
        """An already decoded array."""
        filled = cls()
        filled.start(array)
        filled.finish()
        return filled

    # producer side
    def start(self, array: np.ndarray) -> None:
        with self._cond:
            self._array = array
            self._cond.notify_all()

    def advance(self, rows: int) -> None:
        with self._cond:
            self._ready = rows
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            assert self._array is not None, "finish() before start()"
            self._ready, self._done = len(self._array), True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()

    # reader side
    def _wait(self, ready) -> np.ndarray:
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or ready())
            if self._error is not None:
                raise self._error
            assert self._array is not None
            return self._array

    @property
    def shape(self) -> tuple[int, ...]:
        return self._wait(lambda: self._array is not None).shape

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, stop: int | None = None) -> np.ndarray:
        """The first `stop` rows (all rows when None), once they are all decoded."""
        array = self._wait(lambda: self._done or (stop is not None and self._array is not None and self._ready >= stop))
        return array[:stop]
