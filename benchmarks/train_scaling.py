"""Data-parallel scaling of the train stage on one machine: images/s for 1, 2, 4, 8 ...
workers, at a fixed global batch (each worker's share shrinks) and at a fixed batch per
worker (the global batch grows), with the scaling efficiency against one worker:
efficiency(N) = images/s with N workers / (N x images/s with 1 worker).

    .venv/bin/python benchmarks/train_scaling.py [--workers 1,2,4,8] [--cpus-per-worker 1]
        [--rows 20000] [--epochs 4] [--batch 128] [--per-worker-batch 64] [--preset default]
        [--set KEY=VALUE ...]

Every figure is the median images/s over epochs 2 to N (epoch 1 traces the step and fills
the shard cache), from the stage's own metrics.jsonl; the baseline, one worker, is
measured in the same run. Each worker holds `--cpus-per-worker` cores, so the largest
worker count needs that many times more cores (plus one for Ray Data): 8 x 1 on a
16-core machine.
"""

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def stage_images_per_s(data, root, workers: int, batch: int, args) -> float:
    from pipeline.config import load_config
    from pipeline.stages.train import train

    overrides = [
        f"model.preset={args.preset}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={batch}",
        f"train.num_workers={workers}",
        f"train.cpus_per_worker={args.cpus_per_worker}",
        *args.overrides,
    ]
    out = Path(root) / f"train-{workers}x-{batch}"
    train(load_config(overrides=overrides), data, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(row["images_per_s"] for row in rows[1:])


def table(title: str, results: dict[int, tuple[int, float]]) -> None:
    """`results`: workers -> (global batch, images/s)."""
    base = results[min(results)][1]
    print(title)
    print("  workers  global batch  images/s  speed-up  efficiency")
    for workers, (batch, rate) in sorted(results.items()):
        print(f"  {workers:7d}  {batch:12d}  {rate:8.0f}  {rate / base:7.2f}x  {rate / (workers * base):10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts, comma-separated (1 is always run)")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--rows", type=int, default=20000, help="training rows (data.limit)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128, help="the fixed global batch")
    parser.add_argument("--per-worker-batch", type=int, default=64, help="the fixed batch per worker")
    parser.add_argument("--preset", default="default", help="model.preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    counts = sorted({1, *(int(n) for n in args.workers.split(",") if n)})
    if any(args.batch % n for n in counts):
        parser.error(f"--batch {args.batch} must divide by every worker count {counts}")
    import ray

    from pipeline.cluster.connection import quiet_ray_loggers
    from pipeline.config import load_config
    from pipeline.stages.ingest import ingest

    with tempfile.TemporaryDirectory() as root:
        data = ingest(load_config(overrides=[f"data.limit={args.rows}"]), Path(root) / "data").out
        quiet_ray_loggers()
        cpus = max(os.cpu_count() or 1, max(counts) * args.cpus_per_worker) + 1
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        fixed_global = {n: (args.batch, stage_images_per_s(data, root, n, args.batch, args)) for n in counts}
        fixed_local = {}
        for n in counts:
            batch = n * args.per_worker_batch
            fixed_local[n] = (batch, stage_images_per_s(data, root, n, batch, args))
        ray.shutdown()
    print(f"preset {args.preset}, {args.rows} rows, {args.cpus_per_worker} CPU(s) per worker, "
          f"{os.cpu_count()} cores, median of epochs 2-{args.epochs}:")  # fmt: skip
    table(f"fixed global batch {args.batch}:", fixed_global)
    table(f"fixed batch per worker {args.per_worker_batch}:", fixed_local)


if __name__ == "__main__":
    main()
