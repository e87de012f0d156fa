"""Train-stage throughput, all in one run on the same data and the `seed` preset:
(a) 1 Ray Train worker vs a plain single-process Keras `fit` (same batch size), both on
    the whole machine, and both held to one core (TensorFlow's intra- and inter-op pools);
(b) 2 workers x 1 CPU vs 1 worker x 1 CPU (scaling efficiency = ratio / 2 of images/s).

    .venv/bin/python benchmarks/train_throughput.py [--rows 20000] [--epochs 6]
Targets: (a) >= 1.0x; (b) efficiency >= 0.85. Each figure is the median over epochs 2 to N
(epoch 1 traces the step and fills the worker's in-memory shard).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def stage_images_per_s(data, workers, cpus, epochs, batch, root):
    from pipeline.config import load_config
    from pipeline.train import train

    config = load_config(overrides=[
        "model.preset=seed", f"train.epochs={epochs}", f"train.batch_size={batch}",
        f"train.num_workers={workers}", f"train.cpus_per_worker={cpus}", "train.lr_schedule=constant",
    ])
    out = Path(root) / f"train-{workers}x{cpus}"
    train(config, data, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["images_per_s"] for r in rows[1:])


def keras_fit_images_per_s(data, threads, epochs, batch):
    """Plain Keras `fit` in this process; `threads` caps both TensorFlow pools (0: its defaults)."""
    import keras
    import tensorflow as tf

    from pipeline.ingest import read_split
    from vae import build_vae, preset

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    images, _ = read_split(data, "train")
    x = images[..., None].astype("float32") / 255.0
    model = build_vae(preset("seed"), seed=0)

    class Fit(keras.Model):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def call(self, inputs, training=False):
            return self.vae(inputs, training=training)

        def train_step(self, data):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(self.vae.losses_per_example(data, training=True)[0])
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
            return {"loss": loss}

    fit = Fit(model)
    fit.compile(optimizer=keras.optimizers.Adam(1e-3))
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)

    fit.fit(x, epochs=epochs, batch_size=batch, verbose=0, callbacks=[Timer()], shuffle=True)
    steps = len(x) // batch
    return statistics.median(steps * batch / t for t in times[1:])


def keras_fit_in_subprocess(data, threads, epochs, batch) -> float:
    """TensorFlow's thread pools are fixed once it starts: one process per setting."""
    here = str(Path(__file__).resolve().parent)
    code = (
        f"import json, sys; sys.path.insert(0, {here!r}); from train_throughput import keras_fit_images_per_s; "
        f"print(json.dumps(keras_fit_images_per_s({str(data)!r}, {threads}, {epochs}, {batch})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    import ray
    import ray.data  # noqa: F401  (it sets up its loggers on import; quieted below)

    from pipeline.config import load_config
    from pipeline.ingest import ingest
    from pipeline.ray_cluster import quiet_ray_loggers

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as root:
        data = ingest(load_config(overrides=[f"data.limit={args.rows}"]), Path(root) / "data").out
        quiet_ray_loggers()
        ray.init(num_cpus=cores + 1, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        one = stage_images_per_s(data, 1, 1, args.epochs, args.batch, root)
        one_all = stage_images_per_s(data, 1, cores, args.epochs, args.batch, root)
        two = stage_images_per_s(data, 2, 1, args.epochs, args.batch, root)
        ray.shutdown()
        fit_one = keras_fit_in_subprocess(data, 1, args.epochs, args.batch)
        fit_all = keras_fit_in_subprocess(data, 0, args.epochs, args.batch)
    print(f"seed preset, {args.rows} rows, batch {args.batch}, median of epochs 2-{args.epochs} (images/s):")
    print(f"  Keras fit, TensorFlow's default threads ({cores} cores): {fit_all:8.0f}")
    print(f"  stage, 1 worker x {cores} CPUs:                    {one_all:8.0f}")
    print(f"  Keras fit, 1 thread (intra- and inter-op):     {fit_one:8.0f}")
    print(f"  stage, 1 worker x 1 CPU:                       {one:8.0f}")
    print(f"  stage, 2 workers x 1 CPU:                      {two:8.0f}")
    print(f"(a) stage 1 worker / Keras fit, whole machine each: {one_all / fit_all:.2f}x (target >= 1.0x)")
    print(f"    stage 1 worker / Keras fit, 1 core each:        {one / fit_one:.2f}x")
    print(f"(b) scaling efficiency 2x1 vs 1x1: {two / (2 * one):.2f} (target >= 0.85)")


if __name__ == "__main__":
    main()
