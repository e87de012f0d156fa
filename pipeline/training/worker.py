"""The per-worker training loop run by Ray Train (one process per worker).

`train_func` reads as its steps: start the worker, build the model and optimizer,
restore a checkpoint, compile the step (pipeline.training.steps), then per epoch run
it over the shard (pipeline.training.shard_cache), measure it, and report it with a
checkpoint.

A checkpoint for an object store is uploaded here, under the storage retry limit
(pipeline.storage), and handed to Ray Train already in place: Ray Train's own upload
retries on its own count, and a failure there fails the worker group, which Ray restarts
up to `train.max_failures` times, each restart waiting on the store again.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.schema import CHECKPOINT_PREFIX
from pipeline.storage import Store, is_uri, with_retries
from pipeline.training.model_store import (
    checkpoint_epoch,
    find_latest_checkpoint,
    restore_checkpoint,
    write_checkpoint,
)
from pipeline.training.schedules import learning_rate_schedule, per_worker_batch
from pipeline.training.shard_cache import ShardCache, chunked, streamed_batches
from pipeline.training.steps import Steps, compile_steps, weights_fingerprint
from pipeline.training.worker_context import Worker

# All gradients go into one all-reduce per step instead of one per variable.
ALLREDUCE_PACK_BYTES = 64 << 20


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
    `train_rows` (rows in the training split), `progress` (a queue actor or None),
    `resume_from` (a checkpoint path or URI to start from, or None), `run_storage` (this
    run's checkpoint storage) and `epoch_hook` (None, or a callable run at the start of
    every epoch as `hook(epoch, rank, world, run_name)`: how tests inject faults).

    If the weights (checked after every `steps_per_execution` steps) or an epoch's loss
    stop being finite, every worker stops at the same point (the weights are the same on
    every replica, and the loss sums are all-reduced) without reporting that epoch, and
    rank 0 sends a `diverged` event naming the epoch and steps. It returns rather than
    raises: Ray Train would retry a raised error, and a diverging run diverges again.
    Likewise when rank 0 cannot store a checkpoint within the storage retry limit: every
    worker stops after that epoch and rank 0 sends a `storage_failed` event.
    """
    import ray.train

    worker, strategy = start_worker(loop_config)
    model, optimizer = build_model_and_optimizer(worker, strategy)
    run_storage = loop_config.get("run_storage")
    start_epoch, history = restore(model, optimizer, loop_config.get("resume_from"), run_storage)
    worker.tell_driver(
        {
            "event": "start",
            "epoch": start_epoch,
            "workers": worker.world,
            "groups": worker.groups,
            "onednn": onednn_enabled(),
            "time": time.time(),
        }
    )
    steps = compile_steps(worker, strategy, model, optimizer)
    shard, cache = ray.train.get_dataset_shard("train"), ShardCache()
    for epoch in range(start_epoch, worker.config.train.epochs):
        if loop_config.get("epoch_hook") is not None:
            run_name = ray.train.get_context().get_experiment_name()
            loop_config["epoch_hook"](epoch, worker.rank, worker.world, run_name)
        outcome = run_epoch(worker, steps, shard, cache, epoch)
        if outcome.diverged is not None:
            worker.tell_driver(
                {"event": "diverged", "message": divergence_message(worker.config, epoch, outcome.diverged)}
            )
            return
        metrics = epoch_metrics(worker, steps, model, optimizer, epoch, outcome)
        history = [*history, metrics]
        not_stored = report_epoch(worker, model, optimizer, history, run_storage)
        if stores_remotely(run_storage) and any_worker_failed(steps, not_stored):
            worker.tell_driver({"event": "storage_failed", "message": not_stored})
            return
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
    # Each group's ops run on an inter-op thread with its share of the CPUs for their own.
    cpus, groups = config.train.cpus_per_worker, config.train.groups
    tf.config.threading.set_intra_op_parallelism_threads(max(1, cpus // groups))
    tf.config.threading.set_inter_op_parallelism_threads(max(groups, min(2, cpus)))
    if config.train.precision != "float32":
        keras.mixed_precision.set_global_policy(config.train.precision)
    keras.utils.set_random_seed(config.seed)  # identical initial weights on every worker
    if world == 1:  # nothing to all-reduce: no collective ops in the step
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if config.train.use_gpu else "/cpu:0")
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(bytes_per_pack=ALLREDUCE_PACK_BYTES)
        )
    batch = per_worker_batch(config.train.batch_size, world)
    steps_per_epoch = (loop_config["train_rows"] // world) // batch
    if steps_per_epoch < 1:  # the driver checks this before starting; a bug if reached
        raise ValueError(f"{loop_config['train_rows']} rows give no batch of {batch} per worker")
    worker = Worker(config, rank, world, batch, steps_per_epoch, loop_config.get("progress"), groups)
    return worker, strategy


def onednn_enabled() -> bool | None:
    """Whether this process's TensorFlow runs oneDNN's kernels (TF_ENABLE_ONEDNN_OPTS,
    read when TensorFlow is first imported; the train stage sets it for its workers).
    None where TensorFlow no longer has the private function that says so."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


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


def restore(
    model, optimizer, resume_from: str | None, run_storage: str | None = None
) -> tuple[int, list[dict[str, Any]]]:
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
        checkpoint = checkpoint_at(resume_from)
    uploaded = find_latest_checkpoint(run_storage) if run_storage else None
    registered = checkpoint_epoch(checkpoint.path) if checkpoint is not None else -1
    if uploaded is not None and checkpoint_epoch(uploaded) > registered:
        try:
            return _restore_from(checkpoint_at(uploaded), model, optimizer)
        except (PipelineError, OSError) as exc:
            print(f"train: not resuming from {uploaded} ({exc}); using Ray's latest checkpoint", file=sys.stderr)
    if checkpoint is None:
        return 0, []
    return _restore_from(checkpoint, model, optimizer)


def _restore_from(checkpoint, model, optimizer) -> tuple[int, list[dict[str, Any]]]:
    def read() -> dict[str, Any]:
        with checkpoint.as_directory() as directory:
            return restore_checkpoint(Path(directory), model, optimizer)

    info = with_retries(read, f"{checkpoint.path}: cannot read")
    return info["epoch"] + 1, info["history"]


def checkpoint_at(location: str):
    """A Ray Train checkpoint at a path or URI, read through the pipeline's store (each
    request to `s3://` bounded)."""
    import ray.train

    if not is_uri(location):
        return ray.train.Checkpoint(location)
    store = Store.open(location)
    return ray.train.Checkpoint(path=store.root, filesystem=store.filesystem)


def run_epoch(worker: Worker, steps: Steps, shard, cache: ShardCache, epoch: int) -> EpochOutcome:
    """Train one epoch on this worker's shard (cached in memory after the first epoch)."""
    import tensorflow as tf

    config = worker.config
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
        "groups": worker.groups,
    }


def divergence_message(config: Config, epoch: int, what: str) -> str:
    return (
        f"training diverged: {what} in epoch {epoch + 1}; nothing from that epoch was kept "
        f"(try a lower train.learning_rate than {config.train.learning_rate:g})"
    )


def report_epoch(
    worker: Worker, model, optimizer, history: list[dict[str, Any]], run_storage: str | None
) -> str | None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint. Returns why
    rank 0 could not store it (the storage error's line), or None."""
    import ray.train

    metrics = history[-1]
    if worker.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return None
    name = f"{CHECKPOINT_PREFIX}{metrics['epoch']:04d}"
    with tempfile.TemporaryDirectory(prefix="vae-ckpt-") as directory:
        info = {
            "epoch": metrics["epoch"],
            "config": worker.config.to_dict(),
            "architecture": worker.config.model.architecture(),
            "metrics": metrics,
            "history": history,
        }
        write_checkpoint(Path(directory), model, optimizer, info)
        if not stores_remotely(run_storage):
            # A directory: Ray Train copies it, and checks that every node sees the disk.
            local = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=local, checkpoint_dir_name=name)
            return None
        try:
            stored = upload_checkpoint(Path(directory), run_storage, name)
        except PipelineError as exc:
            ray.train.report(metrics, checkpoint=None)  # the other workers wait on it
            return str(exc)
        ray.train.report(
            metrics,
            checkpoint=stored,
            checkpoint_dir_name=name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )
        return None


def upload_checkpoint(directory: Path, run_storage: str, name: str):
    """The checkpoint in `directory` copied to this run's storage as `name` (each file
    retried within the storage limit); returns it as Ray Train's checkpoint there."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    # Ray Train's own path for this run's directory, written through the pipeline's store.
    store = replace(Store.open(run_storage), root=storage.experiment_fs_path)
    store.upload(directory, name)
    return ray.train.Checkpoint(path=store.path(name), filesystem=storage.storage_filesystem)


def stores_remotely(run_storage: str | None) -> bool:
    """Whether this run's checkpoints go to an object store: rank 0 uploads them itself
    (report_epoch), and only then can storing one fail (any_worker_failed)."""
    return bool(run_storage) and is_uri(run_storage)


def any_worker_failed(steps: Steps, failure: str | None) -> bool:
    """Whether any worker's `failure` is set, agreed by every worker in one all-reduce."""
    import tensorflow as tf

    flags = tf.constant([0.0 if failure is None else 1.0, 0.0, 0.0], tf.float64)  # the shape of the loss sums
    return bool(steps.sum_over_workers(flags).numpy()[0] > 0)
