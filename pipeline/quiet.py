"""Importing TensorFlow without its C++ start-up banner on the user's terminal."""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def stderr_silenced():
    """Point file descriptor 2 at /dev/null for the block (C++ writes bypass sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow once with stderr silenced: TensorFlow's absl logging prints
    oneDNN and CUDA notices before TF_CPP_MIN_LOG_LEVEL takes effect."""
    if "tensorflow" in sys.modules:
        return
    with stderr_silenced():
        import tensorflow  # noqa: F401
