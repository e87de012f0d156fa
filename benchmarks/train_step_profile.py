"""Where one training step of the default model spends its time: TensorFlow's profiler
around the step the train stage compiles (pipeline.training.steps: one group's forward,
objective and backward, then Adam): its step time, its largest ops, the FLOP count per
image and the fraction of the machine's peak it reaches.

    .venv/bin/python benchmarks/train_step_profile.py [--steps 40] [--batch 64]
        [--peak-gflops 330]

It profiles each setting in its own process (TensorFlow reads its kernel choice and
thread pools once): TensorFlow's own kernels (TF_ENABLE_ONEDNN_OPTS=0, the old code's
setting on this CPU) against oneDNN's (what the stage now turns on), each on one thread,
the share of one core a group gets. No Ray and no all-reduce here: the stage's own
figures (benchmarks/train_throughput.py, `vae-pipeline run`) hold those.

FLOPs: TensorFlow's graph profiler (`tf.compat.v1.profiler`, float_operation) over the
group step's graph: forward, backward and both encoder passes, per training image.
Peak: 2 cores x 64 float32 FLOP a cycle (two 512-bit FMA pipes) x ~2.6 GHz = ~330 GFLOP/s.
"""

import argparse
import collections
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CONTAINERS = ("PartitionedCall", "While", "If", "Case")


def short_name(name: str) -> str:
    """ "scope/vae_1/decoder_1/logits_1/conv_transpose:Type" -> "decoder_1/logits_1/conv_transpose:Type"."""
    grad = "grad " if name.startswith("gradient_tape/") else ""
    return grad + "/".join(name.split("/")[-3:])


def profile_in_this_process(steps: int, batch: int) -> dict:
    """Profile `steps` group steps of the default config on one thread; returns the
    milliseconds per step of each part, the total and the FLOPs per image."""
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from pipeline.config import load_config
    from pipeline.training.schedules import free_bits_schedule
    from pipeline.training.steps import make_replica_step
    from pipeline.training.worker import build_model_and_optimizer, onednn_enabled
    from pipeline.training.worker_context import Worker

    config = load_config(overrides=[f"train.batch_size={batch}", "train.num_workers=1", "train.groups_per_worker=1"])
    worker = Worker(config, rank=0, world=1, batch=batch, steps_per_epoch=60000 // batch, progress=None, groups=1)
    model, optimizer = build_model_and_optimizer(worker, tf.distribute.get_strategy())
    step = tf.function(make_replica_step(worker, model, optimizer, free_bits_schedule(config, worker.steps_per_epoch)))
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (batch, 28, 28), dtype=np.uint8))
    spec = (tf.TensorSpec((batch, 28, 28), tf.uint8), tf.TensorSpec((1, 2), tf.int32))
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    graph = step.get_concrete_function(*spec).graph
    flops = tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops
    for i in range(5):  # trace and warm up
        step(images, tf.constant([[0, i]]))
    started = time.perf_counter()
    for i in range(steps):
        step(images, tf.constant([[1, i]])).numpy()
    seconds = (time.perf_counter() - started) / steps
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for i in range(steps):
            step(images, tf.constant([[2, i]])).numpy()
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        space.ParseFromString(Path(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0]).read_bytes())
    ops: collections.Counter = collections.Counter()
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if ":" in name and "::" not in name and not name.rsplit(":", 1)[1].endswith(CONTAINERS):
                    ops[short_name(name)] += event.duration_ps / 1e9 / steps
    return {
        "onednn": onednn_enabled(),
        "ms_per_step": seconds * 1e3,
        "images_per_s": batch / seconds,
        "mflop_per_image": flops / batch / 1e6,
        "largest_ops_ms": dict(ops.most_common(12)),
    }


def profile_in_subprocess(onednn: str, steps: int, batch: int) -> dict:
    here = str(Path(__file__).resolve().parent)
    code = (
        f"import json, sys; sys.path.insert(0, {here!r}); from train_step_profile import profile_in_this_process; "
        f"print(json.dumps(profile_in_this_process({steps}, {batch})))"
    )
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64, help="images a group steps on (the default's: 64)")
    parser.add_argument("--peak-gflops", type=float, default=330.0, help="the machine's float32 peak, all cores")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    eigen = profile_in_subprocess("0", args.steps, args.batch)
    onednn = profile_in_subprocess("1", args.steps, args.batch)
    print(f"one group step of the default model, batch {args.batch}, one thread, mean of {args.steps} steps:")
    for label, result in (("TensorFlow kernels", eigen), ("oneDNN kernels", onednn)):
        print(f"  {label}: {result['ms_per_step']:.1f} ms a step; its largest ops (ms a step):")
        for name, ms in result["largest_ops_ms"].items():
            print(f"    {ms:6.2f}  {name}")
    flop = onednn["mflop_per_image"]
    print(f"FLOPs per training image: {flop:.1f} MFLOP (TensorFlow's graph profiler)")
    for label, result in (("TensorFlow kernels", eigen), ("oneDNN kernels", onednn)):
        gflops = result["images_per_s"] * flop / 1e3
        share = gflops / (args.peak_gflops / cores)
        print(
            f"  {label}: {result['images_per_s']:.0f} images/s on one core = {gflops:.0f} GFLOP/s,"
            f" {share:.0%} of one core's peak ({args.peak_gflops / cores:.0f} GFLOP/s)"
        )
    print(f"oneDNN / TensorFlow kernels, step time: {eigen['ms_per_step'] / onednn['ms_per_step']:.2f}x")


if __name__ == "__main__":
    main()
