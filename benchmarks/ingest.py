"""Full ingest from the local IDX files vs only reading and gunzipping them (same run).

    .venv/bin/python benchmarks/ingest.py [--source DIR] [--repeats 5]
Target: ratio under 2.0x. The baseline reads the four files one after the other and
gunzips each with one zlib call (the fastest way the standard library has, ~12% faster
than gzip.open().read()); the stage may use both cores.
"""

import argparse
import statistics
import tempfile
import time
import zlib
from pathlib import Path

from pipeline.config import load_config
from pipeline.data.sources import DEBIAN_DIR
from pipeline.schema import IDX_FILES
from pipeline.stages.ingest import ingest


def gunzip_only(source: Path) -> int:
    names = [name for pair in IDX_FILES.values() for name in pair]
    return sum(len(zlib.decompress((source / name).read_bytes(), wbits=16 + zlib.MAX_WBITS)) for name in names)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path, default=DEBIAN_DIR)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = load_config(overrides=[f"data.source=idx:{args.source}"])
    baseline, full = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        gunzip_only(args.source)
        baseline.append(time.perf_counter() - started)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            ingest(config, Path(tmp) / "out")
            full.append(time.perf_counter() - started)
    b, f = statistics.median(baseline), statistics.median(full)
    print(f"read+gunzip only: {b:.3f} s   full ingest: {f:.3f} s   (median of {args.repeats})")
    print(f"ratio full/baseline: {f / b:.2f}x (target < 2.0x)")


if __name__ == "__main__":
    main()
