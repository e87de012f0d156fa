"""Small data makers shared by the tests (no fixtures here: plain functions)."""

from __future__ import annotations

import gzip
import os
import socket
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.schema import IDX_FILES

REAL_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array (1 or 3 dims) in the IDX format."""
    magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def synthetic_split(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(rows) % 10).astype(np.uint8)
    images = rng.integers(0, 256, size=(rows, 28, 28), dtype=np.uint8)
    return images, labels


def write_idx_dir(directory: Path, train_rows: int = 10, test_rows: int = 2, seed: int = 0) -> Path:
    """Write the four gzipped IDX files of a tiny synthetic Fashion-MNIST."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        images, labels = synthetic_split(rows, seed + (split == "test"))
        image_name, label_name = IDX_FILES[split]
        (directory / image_name).write_bytes(gzip.compress(idx_bytes(images)))
        (directory / label_name).write_bytes(gzip.compress(idx_bytes(labels)))
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_real_data() -> bool:
    return all((REAL_DATA_DIR / name).is_file() for pair in IDX_FILES.values() for name in pair)


def tree_snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes, to prove nothing changed."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def single_error_line(err: str, program: str = "vae-pipeline") -> str:
    """The one `PROGRAM: error: ...` line of a command's stderr, which must be its last line
    (progress lines may come before it), with no traceback anywhere."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{program}: error: ")]
    assert "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-10:]
    return errors[0]


def poison_keras_file(path: Path) -> None:
    """Set the first floating-point weight array of a `.keras` file to NaN, as a diverged
    run would leave it (the file stays a valid Keras model)."""
    import io
    import zipfile

    import h5py

    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    buffer = io.BytesIO(members["model.weights.h5"])
    with h5py.File(buffer, "r+") as weights:
        names = []
        weights.visititems(
            lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) and item.dtype.kind == "f" else None
        )
        weights[names[0]][...] = np.nan
    members["model.weights.h5"] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@dataclass(frozen=True)
class CrashOnce:
    """A training `epoch_hook` (pipeline.stages.train.train): the last worker's process
    dies at the start of `epoch` the first time a run gets there (a marker file in the
    node's temporary directory makes it once per run, so a restarted worker group trains
    on). It dies `delay_s` into the epoch, as a real crash would: Ray Train's controller
    collects the workers' reports (and so registers their checkpoints) every 2 s, and a
    crash right after a report can lose it."""

    epoch: int
    delay_s: float = 5.0

    def __call__(self, epoch: int, rank: int, world: int, run_name: str) -> None:
        marker = Path(tempfile.gettempdir()) / f"vae-pipeline-fault-{run_name}"
        if epoch == self.epoch and rank == world - 1 and not marker.exists():
            marker.touch()
            time.sleep(self.delay_s)
            os._exit(17)


def usage_error_line(main, argv: list[str], capsys) -> str:
    """The one line a command line's `main(argv)` prints for a usage error, which must
    exit with status 2."""
    import pytest

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    return line


@dataclass(frozen=True)
class PauseAtEpoch:
    """A training `epoch_hook`: rank 0, at the start of `epoch`, creates `directory/asked`
    and waits (up to a minute) for `directory/done`, so that a test can change the world
    between two epochs (stop the object store, say)."""

    directory: str
    epoch: int

    def __call__(self, epoch: int, rank: int, world: int, run_name: str) -> None:
        if epoch != self.epoch or rank != 0:
            return
        Path(self.directory, "asked").touch()
        deadline = time.monotonic() + 60
        while not Path(self.directory, "done").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
