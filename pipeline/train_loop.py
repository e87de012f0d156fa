"""The per-worker training loop run by Ray Train (one process per worker).

Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585),
so the step is written by hand: `strategy.run` inside a `tf.function`, per-example
losses summed and divided by the *global* batch, and a Keras 3 optimizer built in
the strategy scope (it all-reduces the gradients across workers).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.model_store import read_checkpoint, write_checkpoint
from pipeline.schema import CHECKPOINT_PREFIX, COLUMN_IMAGE, IMAGE_SHAPE

SHUFFLE_BUFFER_ROWS = 8192
# A worker keeps its shard in memory after the first epoch when it is at most this
# big (all of Fashion-MNIST is 47 MB); later epochs shuffle it fully and skip Ray Data.
CACHE_LIMIT_BYTES = 2 << 30
# Test-only fault hook: seconds into the epoch before the worker dies.
FAULT_DELAY_S = 5.0
# All gradients go into one all-reduce per step instead of one per variable.
ALLREDUCE_PACK_BYTES = 64 << 20


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


def per_worker_batch(global_batch: int, num_workers: int) -> int:
    """Each worker takes global_batch / num_workers images a step (must divide)."""
    return global_batch // num_workers


def learning_rate_schedule(config: Config, steps_per_epoch: int):
    import keras

    train = config.train
    if train.lr_schedule == "constant":
        return train.learning_rate
    return keras.optimizers.schedules.CosineDecay(
        train.learning_rate, decay_steps=max(1, train.epochs * steps_per_epoch), alpha=0.05
    )


def weights_fingerprint(model) -> np.ndarray:
    """Four exactly representable floats from a SHA-256 of every weight's bytes."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return np.frombuffer(digest.digest()[:8], dtype=np.uint16).astype(np.float64)


def inject_fault_once(run_name: str) -> None:
    """Test-only fault hook: kill this worker process the first time it gets here in a run.

    A marker file in the node's temporary directory makes it happen once per run, so
    the restarted worker group trains on. The crash comes FAULT_DELAY_S into the epoch,
    as a real one would: Ray Train's controller collects the workers' reports (and so
    registers their checkpoints) every 2 s, and a crash right after a report can lose it.
    """
    marker = Path(tempfile.gettempdir()) / f"vae-pipeline-fault-{run_name}"
    if not marker.exists():
        marker.touch()
        time.sleep(FAULT_DELAY_S)
        os._exit(17)


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. `loop_config` holds `config` (a Config dict),
    `train_rows` (rows in the training split), `progress` (a queue actor or None) and
    `resume_from` (a checkpoint path or URI to start from, or None).

    If the weights (checked after every `steps_per_execution` steps) or an epoch's loss
    stop being finite, every worker stops at the same point (the weights are the same on
    every replica, and the loss sums are all-reduced) without reporting that epoch, and
    rank 0 sends a `diverged` event naming the epoch and steps. It returns rather than raises: Ray Train would retry a raised error, and
    a diverging run diverges again.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import ray.train
    import tensorflow as tf

    from vae import VAEConfig, build_vae, free_bits_kl, get_state, neg_elbo, set_state

    config = Config.from_dict(loop_config["config"])
    progress = loop_config.get("progress")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    threads = config.train.cpus_per_worker
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    if config.train.precision != "float32":
        keras.mixed_precision.set_global_policy(config.train.precision)
    keras.utils.set_random_seed(config.seed)  # identical initial weights on every worker

    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(bytes_per_pack=ALLREDUCE_PACK_BYTES)
    )
    batch = per_worker_batch(config.train.batch_size, world)
    global_batch = batch * world
    steps_per_epoch = (loop_config["train_rows"] // world) // batch
    if steps_per_epoch < 1:  # the driver checks this before starting; a bug if reached
        raise ValueError(f"{loop_config['train_rows']} rows give no batch of {batch} per worker")
    architecture = VAEConfig.from_dict(config.model.architecture())
    free_bits = config.train.free_bits
    with strategy.scope():
        model = build_vae(architecture, seed=config.seed)
        optimizer = keras.optimizers.Adam(learning_rate_schedule(config, steps_per_epoch))
        if config.train.precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)

    start_epoch, history = 0, []
    # After a worker failure Ray Train hands back the run's latest checkpoint; on a
    # fresh start an earlier run's checkpoint may be given (`--resume`).
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(loop_config["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state, info = read_checkpoint(Path(directory))
        set_state(state, model, optimizer)
        start_epoch, history = info["epoch"] + 1, info["history"]
    if rank == 0 and progress is not None:
        progress.put({"event": "start", "epoch": start_epoch, "workers": world})

    # A chunk of up to `steps_per_execution` batches runs as one TensorFlow call.
    chunk_spec = tf.TensorSpec((None, batch, *IMAGE_SHAPE), tf.uint8)

    def replica_step(images, noise_seed):
        # Pixels scaled to [0, 1] on the fly; (batch, 28, 28) -> (batch, 28, 28, 1).
        x = tf.cast(images, tf.float32)[..., None] / 255.0
        eps = tf.random.stateless_normal((batch, architecture.latent_dim), seed=noise_seed)
        with tf.GradientTape() as tape:
            z_mean, z_log_var, logits = model(x, training=True, eps=eps)
            loss, reconstruction, kl = neg_elbo(x, logits, z_mean, z_log_var, beta=architecture.beta)
            if free_bits > 0:  # the objective; the metrics below stay the true ELBO
                kl_term = batch * free_bits_kl(z_mean, z_log_var, free_bits)
                scaled = (tf.reduce_sum(reconstruction) + architecture.beta * kl_term) / global_batch
            else:
                scaled = tf.reduce_sum(loss) / global_batch
            if config.train.precision == "mixed_float16":
                scaled = optimizer.scale_loss(scaled)
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        sums = tf.stack([tf.reduce_sum(loss), tf.reduce_sum(reconstruction), tf.reduce_sum(kl)])
        return tf.cast(sums, tf.float64)

    @tf.function(input_signature=[chunk_spec, tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.int32)])
    def train_steps(chunk, epoch, first_step):
        """One step per batch of `chunk`; returns this worker's (loss, recon, kl) sums,
        which are summed across workers once an epoch, not every step, and whether every
        weight is still finite after the chunk (the same answer on every replica)."""
        totals = tf.zeros(3, tf.float64)
        for i in tf.range(tf.shape(chunk)[0]):
            noise_seed = tf.stack([config.seed * 1_000_003 + epoch, (first_step + i) * world + rank])
            per_replica = strategy.run(replica_step, args=(chunk[i], noise_seed))
            totals += strategy.experimental_local_results(per_replica)[0]
        finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in model.trainable_variables]))
        return totals, finite

    @tf.function
    def sum_over_workers(local):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(local)), axis=None)

    @tf.function
    def replica_spread(fingerprint):
        # (world * 4,) -> (world, 4): every replica's fingerprint, on every worker.
        gathered = tf.reshape(strategy.gather(strategy.run(lambda: tf.identity(fingerprint)), axis=0), (-1, 4))
        return tf.reduce_max(tf.reduce_max(gathered, axis=0) - tf.reduce_min(gathered, axis=0))

    shard = ray.train.get_dataset_shard("train")
    cache = ShardCache()
    for epoch in range(start_epoch, config.train.epochs):
        if config.train.fault_at_epoch == epoch and rank == world - 1:
            inject_fault_once(context.get_experiment_name())
        started = time.perf_counter()
        totals, step = np.zeros(3), 0
        shuffle_seed = config.seed * 100_003 + epoch * 1009 + rank
        if cache.images is not None:
            batches = cache.epoch_batches(batch, steps_per_epoch, shuffle_seed)
        else:
            batches = streamed_batches(shard, batch, shuffle_seed, cache)
        # Every worker must run the same number of collective steps: the first
        # steps_per_epoch batches train, the rest of a streamed shard is only cached.
        diverged = None
        for chunk in chunked(itertools.islice(batches, steps_per_epoch), config.train.steps_per_execution):
            sums, finite = train_steps(tf.constant(chunk), tf.constant(epoch), tf.constant(step))
            if not bool(finite):
                diverged = f"non-finite weights within steps {step + 1}-{step + len(chunk)} of {steps_per_epoch}"
                break
            totals += sums.numpy()
            step += len(chunk)
        if diverged is None:
            for _ in batches:
                pass
            cache.seal(min_rows=steps_per_epoch * batch)
            totals = sum_over_workers(tf.constant(totals, tf.float64)).numpy()
            if not np.isfinite(totals).all():
                diverged = "non-finite loss"
        if diverged is not None:
            if rank == 0 and progress is not None:
                progress.put({"event": "diverged", "message": divergence_message(config, epoch, diverged)})
            return
        seconds = time.perf_counter() - started
        images = step * global_batch
        spread = float(replica_spread(tf.constant(weights_fingerprint(model))).numpy())
        metrics = {
            "epoch": epoch,
            "loss": totals[0] / images,
            "reconstruction": totals[1] / images,
            "kl": totals[2] / images,
            "images_per_s": images / seconds,
            "epoch_time_s": seconds,
            "learning_rate": float(np.asarray(optimizer.learning_rate)),
            "replicas_agree": spread == 0.0,
            "workers": world,
        }
        history = [*history, metrics]
        report_epoch(model, optimizer, config, epoch, history, metrics, rank, get_state)
        if rank == 0 and progress is not None:
            progress.put({"event": "epoch", **metrics})


def divergence_message(config: Config, epoch: int, what: str) -> str:
    return (
        f"training diverged: {what} in epoch {epoch + 1}; nothing from that epoch was kept "
        f"(try a lower train.learning_rate than {config.train.learning_rate:g})"
    )


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


def report_epoch(model, optimizer, config, epoch, history, metrics, rank, get_state) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="vae-ckpt-") as directory:
        info = {
            "epoch": epoch,
            "config": config.to_dict(),
            "architecture": config.model.architecture(),
            "metrics": metrics,
            "history": history,
        }
        write_checkpoint(Path(directory), get_state(model, optimizer), info)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{epoch:04d}",
        )
