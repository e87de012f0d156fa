"""Train-stage throughput, all in one run on the same data and the `seed` preset:
(a) 1 Ray Train worker vs a plain single-process Keras `fit` (same batch size), both on
    the whole machine (the worker with its default groups, one per core), and both held to
    one core (TensorFlow's intra- and inter-op pools);
(b) 2 workers x 1 CPU vs 1 worker x 1 CPU (scaling efficiency = ratio / 2 of images/s),
    at the batch size and at each `--scaling-batches` size; and, as a control, against
    1 worker x 1 CPU while a one-thread Keras `fit` keeps another core busy: on a 2-core
    machine 2 x 1 leaves no core for Ray's and gRPC's own threads, 1 x 1 alone does.

    .venv/bin/python benchmarks/train_throughput.py [--rows 20000] [--epochs 6]
Targets: (a) >= 1.0x; (b) efficiency >= 0.85. Each figure is the median over epochs 2 to N
(epoch 1 traces the step and fills the worker's in-memory shard). The stage runs with its
default `train.steps_per_execution`; Keras `fit` is also timed with the same setting.
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
# The stage's workers run oneDNN's kernels (pipeline.training.worker); Keras `fit`, in this
# process and its subprocesses, gets the same kernels, so the ratios compare the loops.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def stage_images_per_s(data, workers, cpus, epochs, batch, root):
    from pipeline.config import load_config
    from pipeline.stages.train import train

    config = load_config(
        overrides=[
            "model.preset=seed",
            f"train.epochs={epochs}",
            f"train.batch_size={batch}",
            f"train.num_workers={workers}",
            f"train.cpus_per_worker={cpus}",
            "train.lr_schedule=constant",
            "train.contrastive_weight=0",  # its second encoder pass has no counterpart in `fit`
        ]
    )
    out = Path(root) / f"train-{workers}x{cpus}"
    train(config, data, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["images_per_s"] for r in rows[1:])


def keras_fit_images_per_s(data, threads, epochs, batch, steps_per_execution=1, announce=False):
    """Plain Keras `fit` in this process; `threads` caps both TensorFlow pools (0: its defaults).
    `announce`: print a line after every epoch (for a caller waiting on it)."""
    import keras
    import tensorflow as tf

    from pipeline.data.dataset import read_split
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
    fit.compile(optimizer=keras.optimizers.Adam(1e-3), steps_per_execution=steps_per_execution)
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)
            if announce:
                print(f"epoch {epoch + 1}", flush=True)

    fit.fit(x, epochs=epochs, batch_size=batch, verbose=0, callbacks=[Timer()], shuffle=True)
    steps = len(x) // batch
    return statistics.median(steps * batch / t for t in times[1:])


def keras_fit_command(data, threads, epochs, batch, steps_per_execution=1, announce=False) -> list[str]:
    """TensorFlow's thread pools are fixed once it starts: one process per setting."""
    here = str(Path(__file__).resolve().parent)
    call = f"keras_fit_images_per_s({str(data)!r}, {threads}, {epochs}, {batch}, {steps_per_execution}, {announce})"
    code = (
        f"import json, sys; sys.path.insert(0, {here!r}); from train_throughput import keras_fit_images_per_s; "
        f"print(json.dumps({call}))"
    )
    return [sys.executable, "-c", code]


def keras_fit_in_subprocess(data, threads, epochs, batch, steps_per_execution=1) -> float:
    command = keras_fit_command(data, threads, epochs, batch, steps_per_execution)
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def stage_beside_busy_core(data, epochs, batch, root) -> float:
    """1 worker x 1 CPU while a one-thread Keras `fit` (started first, stopped after)
    keeps another core busy, as the second worker does in 2 x 1."""
    busy = subprocess.Popen(
        keras_fit_command(data, 1, 10**6, batch, announce=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        busy.stdout.readline()  # its first epoch is done: it is tracing no more
        return stage_images_per_s(data, 1, 1, epochs, batch, root)
    finally:
        busy.kill()
        busy.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--scaling-batches", default="512", help="more global batches for (b), comma-separated")
    args = parser.parse_args()
    import ray
    import ray.data  # noqa: F401  (it sets up its loggers on import; quieted below)

    from pipeline.cluster.connection import quiet_ray_loggers
    from pipeline.config import TrainConfig, load_config
    from pipeline.stages.ingest import ingest

    cores = os.cpu_count() or 1
    spe = TrainConfig().steps_per_execution
    scaling_batches = [args.batch, *(int(b) for b in args.scaling_batches.split(",") if b and int(b) != args.batch)]
    with tempfile.TemporaryDirectory() as root:
        data = ingest(load_config(overrides=[f"data.limit={args.rows}"]), Path(root) / "data").out
        quiet_ray_loggers()
        ray.init(num_cpus=cores + 1, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        scaling = {}
        for batch in scaling_batches:
            scaling[batch] = (
                stage_images_per_s(data, 1, 1, args.epochs, batch, root),
                stage_images_per_s(data, 2, 1, args.epochs, batch, root),
            )
        one, two = scaling[args.batch]
        one_busy = stage_beside_busy_core(data, args.epochs, args.batch, root)
        one_all = stage_images_per_s(data, 1, cores, args.epochs, args.batch, root)
        ray.shutdown()
        fit_one = keras_fit_in_subprocess(data, 1, args.epochs, args.batch)
        fit_all = keras_fit_in_subprocess(data, 0, args.epochs, args.batch)
        fit_one_spe = keras_fit_in_subprocess(data, 1, args.epochs, args.batch, spe)
    print(f"seed preset, {args.rows} rows, batch {args.batch}, median of epochs 2-{args.epochs} (images/s):")
    print(f"  Keras fit, TensorFlow's default threads ({cores} cores): {fit_all:8.0f}")
    groups = load_config(
        overrides=[f"train.batch_size={args.batch}", "train.num_workers=1", f"train.cpus_per_worker={cores}"]
    ).train.groups
    print(f"  stage, 1 worker x {cores} CPUs ({groups} groups):         {one_all:8.0f}")
    print(f"  Keras fit, 1 thread (intra- and inter-op):     {fit_one:8.0f}")
    print(f"  Keras fit, 1 thread, steps_per_execution={spe}:   {fit_one_spe:8.0f}")
    print(f"  stage, 1 worker x 1 CPU:                       {one:8.0f}")
    print(f"  stage, 2 workers x 1 CPU:                      {two:8.0f}")
    print(f"  stage, 1 worker x 1 CPU, another core busy:    {one_busy:8.0f}")
    print(f"(a) stage 1 worker / Keras fit, whole machine each: {one_all / fit_all:.2f}x (target >= 1.0x)")
    print(f"    stage 1 worker / Keras fit, 1 core each:        {one / fit_one:.2f}x")
    print(f"    the same, Keras fit with steps_per_execution={spe}: {one / fit_one_spe:.2f}x")
    for batch, (one_b, two_b) in scaling.items():
        print(
            f"(b) scaling efficiency 2x1 vs 1x1, global batch {batch}: {two_b / (2 * one_b):.2f}"
            f" ({two_b:.0f} vs {one_b:.0f} images/s; target >= 0.85)"
        )
    print(
        f"    control: 2x1 vs 1x1 with another core busy, global batch {args.batch}: {two / (2 * one_busy):.2f}"
        f" (1x1 itself runs at {one_busy / one:.2f} of its speed with no spare core)"
    )


if __name__ == "__main__":
    main()
