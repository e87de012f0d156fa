import threading

import numpy as np
import pytest

from pipeline.data.progressive import ProgressiveArray
from pipeline.errors import PipelineError


def test_readers_get_early_rows_before_the_producer_finishes():
    array = np.zeros((4, 2), np.uint8)
    filled = ProgressiveArray()
    got = {}
    reader = threading.Thread(target=lambda: got.update(rows=filled.rows(2).copy(), length=len(filled)))
    reader.start()
    filled.start(array)
    array[:2] = 7
    filled.advance(2)
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert got["length"] == 4
    np.testing.assert_array_equal(got["rows"], np.full((2, 2), 7))
    array[2:] = 9
    filled.finish()
    np.testing.assert_array_equal(filled.rows(), array)


def test_a_failure_wakes_every_waiting_reader():
    filled = ProgressiveArray()
    errors = []

    def read():
        try:
            filled.rows(3)
        except PipelineError as exc:
            errors.append(str(exc))

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    filled.start(np.zeros((5, 1), np.uint8))
    filled.advance(1)
    filled.fail(PipelineError("x.gz: corrupt"))
    for reader in readers:
        reader.join(timeout=10)
    assert errors == ["x.gz: corrupt"] * 3
    with pytest.raises(PipelineError, match="corrupt"):
        len(filled)
