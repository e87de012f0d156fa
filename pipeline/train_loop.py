"""The per-worker training loop run by Ray Train (one process per worker).

`train_func` reads as its steps: start the worker, build the model and optimizer,
restore a checkpoint, compile the step, then per epoch run it, measure it, and report
it with a checkpoint. Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585), so the step is written by hand: `strategy.run` inside a
`tf.function`, per-example losses summed and divided by the *global* batch, and a
Keras 3 optimizer built in the strategy scope (it all-reduces the gradients).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.model_store import (
    checkpoint_epoch,
    find_latest_checkpoint,
    restore_checkpoint,
    write_checkpoint,
)
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


def _steps(epochs: int, steps_per_epoch: int) -> int:
    return max(1, epochs * steps_per_epoch)


def learning_rate_schedule(config: Config, steps_per_epoch: int):
    import keras

    train = config.train
    if train.lr_schedule == "constant":
        return train.learning_rate
    return keras.optimizers.schedules.CosineDecay(
        train.learning_rate, decay_steps=_steps(train.epochs, steps_per_epoch), alpha=0.05
    )


def free_bits_schedule(config: Config, steps_per_epoch: int):
    """step -> the free-bits floor (nats per latent dimension) at that training step: a
    cosine from `train.free_bits` at step 0 down to `train.free_bits_final` at the end of
    epoch `train.free_bits_fall_epochs` (default: the last step), then constant; a constant
    `free_bits` when the final value is unset or not below it (so `--set
    train.free_bits=0` still trains the plain ELBO)."""
    import keras

    train = config.train
    final = train.free_bits if train.free_bits_final is None else min(train.free_bits_final, train.free_bits)
    if final == train.free_bits:
        return lambda step: train.free_bits
    fall = min(train.epochs, train.free_bits_fall_epochs or train.epochs)
    # after its decay_steps a CosineDecay stays at alpha * initial = 0
    excess = keras.optimizers.schedules.CosineDecay(train.free_bits - final, decay_steps=_steps(fall, steps_per_epoch))
    return lambda step: final + excess(step)


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


@dataclass(frozen=True)
class Worker:
    """This worker's place in the run and the batch arithmetic every step shares."""

    config: Config
    rank: int
    world: int
    batch: int  # images per worker per step
    steps_per_epoch: int
    progress: Any  # a ray.util.queue.Queue for the driver, or None

    @property
    def global_batch(self) -> int:
        return self.batch * self.world

    def tell_driver(self, event: dict[str, Any]) -> None:
        """Rank 0 speaks for the worker group. The channel is for progress lines only: if
        its actor is gone (its node died), training goes on without them."""
        if self.rank != 0 or self.progress is None:
            return
        import ray

        try:
            self.progress.put(event)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            print(f"train: progress channel lost ({type(exc).__name__}); epoch lines stop", file=sys.stderr)


@dataclass(frozen=True)
class EpochOutcome:
    """Summed (loss, reconstruction, kl) over every worker, the steps run, and why the
    epoch stopped early (None when it did not)."""

    totals: np.ndarray
    steps: int
    seconds: float
    diverged: str | None = None


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. `loop_config` holds `config` (a Config dict),
    `train_rows` (rows in the training split), `progress` (a queue actor or None) and
    `resume_from` (a checkpoint path or URI to start from, or None).

    If the weights (checked after every `steps_per_execution` steps) or an epoch's loss
    stop being finite, every worker stops at the same point (the weights are the same on
    every replica, and the loss sums are all-reduced) without reporting that epoch, and
    rank 0 sends a `diverged` event naming the epoch and steps. It returns rather than
    raises: Ray Train would retry a raised error, and a diverging run diverges again.
    """
    import ray.train

    worker, strategy = start_worker(loop_config)
    model, optimizer = build_model_and_optimizer(worker, strategy)
    start_epoch, history = restore(model, optimizer, loop_config.get("resume_from"), loop_config.get("run_storage"))
    worker.tell_driver({"event": "start", "epoch": start_epoch, "workers": worker.world, "time": time.time()})
    steps = compile_steps(worker, strategy, model, optimizer)
    shard, cache = ray.train.get_dataset_shard("train"), ShardCache()
    for epoch in range(start_epoch, worker.config.train.epochs):
        outcome = run_epoch(worker, steps, shard, cache, epoch)
        if outcome.diverged is not None:
            worker.tell_driver({"event": "diverged", "message": divergence_message(worker.config, epoch, outcome.diverged)})
            return
        metrics = epoch_metrics(worker, steps, model, optimizer, epoch, outcome)
        history = [*history, metrics]
        report_epoch(worker, model, optimizer, history)
        worker.tell_driver({"event": "epoch", **metrics})


def start_worker(loop_config: dict[str, Any]):
    """Threads, precision and seeds for this process; its `Worker` and the strategy."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import ray.train
    import tensorflow as tf

    config = Config.from_dict(loop_config["config"])
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
    steps_per_epoch = (loop_config["train_rows"] // world) // batch
    if steps_per_epoch < 1:  # the driver checks this before starting; a bug if reached
        raise ValueError(f"{loop_config['train_rows']} rows give no batch of {batch} per worker")
    worker = Worker(config, rank, world, batch, steps_per_epoch, loop_config.get("progress"))
    return worker, strategy


def build_model_and_optimizer(worker: Worker, strategy):
    """The VAE and its Adam optimizer (loss-scaled under mixed_float16), built in the
    strategy's scope so that the optimizer all-reduces gradients across workers."""
    import keras

    from vae import VAEConfig, build_vae

    config = worker.config
    with strategy.scope():
        model = build_vae(VAEConfig.from_dict(config.model.architecture()), seed=config.seed)
        optimizer = keras.optimizers.Adam(learning_rate_schedule(config, worker.steps_per_epoch))
        if config.train.precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    return model, optimizer


def restore(model, optimizer, resume_from: str | None, run_storage: str | None = None) -> tuple[int, list[dict[str, Any]]]:
    """The first epoch to run and the history so far. After a worker failure Ray Train
    hands back the latest checkpoint its controller registered; on a fresh start an
    earlier run's checkpoint may be given (`--resume`).

    A node that dies after its worker uploaded a checkpoint but before the controller took
    the report leaves a newer checkpoint in this run's storage (`run_storage`) than Ray
    hands back. That one is used when it reads back whole, so the epoch is not trained
    twice; a half-uploaded one fails `check_checkpoint` and Ray's is used."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from:
        checkpoint = ray.train.Checkpoint(resume_from)
    uploaded = find_latest_checkpoint(run_storage) if run_storage else None
    registered = checkpoint_epoch(checkpoint.path) if checkpoint is not None else -1
    if uploaded is not None and checkpoint_epoch(uploaded) > registered:
        try:
            return _restore_from(ray.train.Checkpoint(uploaded), model, optimizer)
        except (PipelineError, OSError) as exc:
            print(f"train: not resuming from {uploaded} ({exc}); using Ray's latest checkpoint", file=sys.stderr)
    if checkpoint is None:
        return 0, []
    return _restore_from(checkpoint, model, optimizer)


def _restore_from(checkpoint, model, optimizer) -> tuple[int, list[dict[str, Any]]]:
    with checkpoint.as_directory() as directory:
        info = restore_checkpoint(Path(directory), model, optimizer)
    return info["epoch"] + 1, info["history"]


class Steps(NamedTuple):
    """The compiled TensorFlow functions of one worker."""

    train: Any  # (chunk, epoch, first_step) -> (this worker's sums, all weights finite)
    sum_over_workers: Any  # (3,) float64 -> the same summed over every worker
    replica_spread: Any  # weights fingerprint -> largest difference between replicas
    free_bits: Any  # optimizer step -> the free-bits floor the step trains with


def contrastive_view(x, seed):
    """Another view of each image of `x` (N, H, W, 1) for the contrastive term, its random
    transform (see vae.augment: shift, mirror, zoom, gain) drawn statelessly from `seed`."""
    import tensorflow as tf

    from vae import augment
    from vae.augment import GAIN, MAX_SHIFT, ZOOM

    n = tf.shape(x)[0]
    seeds = tf.random.experimental.stateless_split(seed + [7, 11], 5)

    def shift(s):
        return tf.cast(tf.random.stateless_uniform((n,), s, -MAX_SHIFT, MAX_SHIFT + 1, tf.int32), tf.float32)

    mirror = tf.cast(tf.random.stateless_uniform((n,), seeds[2]) < 0.5, tf.float32)
    zoom = tf.random.stateless_uniform((n,), seeds[3], *ZOOM)
    gain = tf.random.stateless_uniform((n,), seeds[4], *GAIN)
    # The shifts' sign is arbitrary (a symmetric draw); negated, they are the draws the
    # measured runs of docs/benchmarks.md used.
    return augment(x, -shift(seeds[0]), -shift(seeds[1]), mirror, zoom, gain)


def compile_steps(worker: Worker, strategy, model, optimizer) -> Steps:
    """The training step (`strategy.run` inside a `tf.function`; Keras 3's `model.fit`
    fails under MultiWorkerMirroredStrategy) and the two cross-worker reductions."""
    import tensorflow as tf

    from vae import free_bits_kl, info_nce, neg_elbo

    config, batch, global_batch = worker.config, worker.batch, worker.global_batch
    latent_dim, beta = model.config.latent_dim, model.config.beta
    free_bits = free_bits_schedule(config, worker.steps_per_epoch)
    uses_free_bits = config.train.free_bits > 0
    likelihood = model.config.likelihood
    scaled_loss = config.train.precision == "mixed_float16"
    contrastive = config.train.contrastive_weight > 0

    def replica_step(images, noise_seed):
        # Pixels scaled to [0, 1] on the fly; (batch, 28, 28) -> (batch, 28, 28, 1).
        x = tf.cast(images, tf.float32)[..., None] / 255.0
        eps = tf.random.stateless_normal((batch, latent_dim), seed=noise_seed)
        with tf.GradientTape() as tape:
            z_mean, z_log_var, logits = model(x, training=True, eps=eps)
            loss, reconstruction, kl = neg_elbo(x, logits, z_mean, z_log_var, beta=beta, likelihood=likelihood)
            if uses_free_bits:  # the objective; the metrics below stay the true ELBO
                kl_term = batch * free_bits_kl(z_mean, z_log_var, free_bits(optimizer.iterations))
                objective = (tf.reduce_sum(reconstruction) + beta * kl_term) / global_batch
            else:
                objective = tf.reduce_sum(loss) / global_batch
            if contrastive:  # training-only too: the view's latent means should be the image's
                view_mean, _ = model.encoder(contrastive_view(x, noise_seed), training=True)
                nce = info_nce(tf.cast(z_mean, tf.float32), tf.cast(view_mean, tf.float32), config.train.contrastive_temperature)
                objective += config.train.contrastive_weight * tf.reduce_sum(nce) / global_batch
            if scaled_loss:
                objective = optimizer.scale_loss(objective)
        gradients = tape.gradient(objective, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        sums = tf.stack([tf.reduce_sum(loss), tf.reduce_sum(reconstruction), tf.reduce_sum(kl)])
        return tf.cast(sums, tf.float64)

    # A chunk of up to `steps_per_execution` batches runs as one TensorFlow call.
    chunk_spec = tf.TensorSpec((None, batch, *IMAGE_SHAPE), tf.uint8)

    @tf.function(input_signature=[chunk_spec, tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.int32)])
    def train(chunk, epoch, first_step):
        # The sums are added across workers once an epoch, not every step.
        totals = tf.zeros(3, tf.float64)
        for i in tf.range(tf.shape(chunk)[0]):
            noise_seed = tf.stack([config.seed * 1_000_003 + epoch, (first_step + i) * worker.world + worker.rank])
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

    return Steps(train, sum_over_workers, replica_spread, free_bits)


def run_epoch(worker: Worker, steps: Steps, shard, cache: ShardCache, epoch: int) -> EpochOutcome:
    """Train one epoch on this worker's shard (cached in memory after the first epoch)."""
    import ray.train
    import tensorflow as tf

    config = worker.config
    if config.train.fault_at_epoch == epoch and worker.rank == worker.world - 1:
        inject_fault_once(ray.train.get_context().get_experiment_name())
    started = time.perf_counter()
    totals, step = np.zeros(3), 0
    shuffle_seed = config.seed * 100_003 + epoch * 1009 + worker.rank
    if cache.images is not None:
        batches = cache.epoch_batches(worker.batch, worker.steps_per_epoch, shuffle_seed)
    else:
        batches = streamed_batches(shard, worker.batch, shuffle_seed, cache)
    # Every worker must run the same number of collective steps: the first
    # steps_per_epoch batches train, the rest of a streamed shard is only cached.
    for chunk in chunked(itertools.islice(batches, worker.steps_per_epoch), config.train.steps_per_execution):
        sums, finite = steps.train(tf.constant(chunk), tf.constant(epoch), tf.constant(step))
        if not bool(finite):
            what = f"non-finite weights within steps {step + 1}-{step + len(chunk)} of {worker.steps_per_epoch}"
            return EpochOutcome(totals, step, time.perf_counter() - started, what)
        totals += sums.numpy()
        step += len(chunk)
    for _ in batches:
        pass
    cache.seal(min_rows=worker.steps_per_epoch * worker.batch)
    totals = steps.sum_over_workers(tf.constant(totals, tf.float64)).numpy()
    seconds = time.perf_counter() - started
    if not np.isfinite(totals).all():
        return EpochOutcome(totals, step, seconds, "non-finite loss")
    return EpochOutcome(totals, step, seconds)


def epoch_metrics(worker: Worker, steps: Steps, model, optimizer, epoch: int, outcome: EpochOutcome) -> dict[str, Any]:
    """What the driver logs for the epoch; checks that every replica holds the same weights."""
    import tensorflow as tf

    images = outcome.steps * worker.global_batch
    spread = float(steps.replica_spread(tf.constant(weights_fingerprint(model))).numpy())
    return {
        "epoch": epoch,
        "loss": outcome.totals[0] / images,
        "reconstruction": outcome.totals[1] / images,
        "kl": outcome.totals[2] / images,
        "images_per_s": images / outcome.seconds,
        "epoch_time_s": outcome.seconds,
        "learning_rate": float(np.asarray(optimizer.learning_rate)),
        "free_bits": float(np.asarray(steps.free_bits(optimizer.iterations))),
        "replicas_agree": spread == 0.0,
        "workers": worker.world,
    }


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


def report_epoch(worker: Worker, model, optimizer, history: list[dict[str, Any]]) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    metrics = history[-1]
    if worker.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="vae-ckpt-") as directory:
        info = {
            "epoch": metrics["epoch"],
            "config": worker.config.to_dict(),
            "architecture": worker.config.model.architecture(),
            "metrics": metrics,
            "history": history,
        }
        write_checkpoint(Path(directory), model, optimizer, info)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{metrics['epoch']:04d}",
        )
