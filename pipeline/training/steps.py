"""The compiled TensorFlow functions of one worker: the training step and the two
reductions across workers.

Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585),
so the step is written by hand: `strategy.run` inside a `tf.function`, the objective
(vae.training_objective) summed and divided by the *global* batch, and a Keras 3
optimizer built in the strategy scope (it all-reduces the gradients).
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import numpy as np

from pipeline.schema import IMAGE_SHAPE
from pipeline.training.schedules import free_bits_schedule
from pipeline.training.worker_context import Worker


def weights_fingerprint(model) -> np.ndarray:
    """Four exactly representable floats from a SHA-256 of every weight's bytes."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return np.frombuffer(digest.digest()[:8], dtype=np.uint16).astype(np.float64)


class Steps(NamedTuple):
    """The compiled TensorFlow functions of one worker."""

    train: Any  # (chunk, epoch, first_step) -> (this worker's sums, all weights finite)
    sum_over_workers: Any  # (3,) float64 -> the same summed over every worker
    replica_spread: Any  # weights fingerprint -> largest difference between replicas
    free_bits: Any  # optimizer step -> the free-bits floor the step trains with


def make_group_gradients(worker: Worker, model, optimizer, free_bits):
    """One group's share of a training step on (group batch, 28, 28) uint8 images: the
    forward pass, the objective (vae.training_objective, divided by the *global* batch)
    and its gradients; returns (gradients, this group's summed (loss, reconstruction, kl)
    as float64). A worker's batch is split into `worker.groups` groups, each with its own
    noise and its own contrastive negatives, as if each were a worker of its own."""
    import tensorflow as tf

    from vae import random_view, reparameterize, training_objective

    train, group_batch = worker.config.train, worker.group_batch
    latent_dim = model.config.latent_dim
    uses_free_bits = train.free_bits > 0
    contrastive = train.contrastive_weight > 0
    scaled_loss = train.precision == "mixed_float16"

    def group_gradients(images, noise_seed):
        # Pixels scaled to [0, 1] on the fly; (batch, 28, 28) -> (batch, 28, 28, 1).
        x = tf.cast(images, tf.float32)[..., None] / 255.0
        eps = tf.random.stateless_normal((group_batch, latent_dim), seed=noise_seed)
        with tf.GradientTape() as tape:
            if contrastive:  # the images and their views through the encoder as one batch
                both_mean, both_log_var = model.encoder(tf.concat([x, random_view(x, noise_seed)], 0), training=True)
                (z_mean, view_mean), z_log_var = tf.split(both_mean, 2), tf.split(both_log_var, 2)[0]
                logits = model.logits(reparameterize(z_mean, z_log_var, eps), x, training=True)
            else:
                z_mean, z_log_var, logits = model(x, training=True, eps=eps)
                view_mean = None
            objective, (loss, reconstruction, kl) = training_objective(
                x,
                logits,
                z_mean,
                z_log_var,
                worker.global_batch,
                beta=model.config.beta,
                likelihood=model.config.likelihood,
                free_bits=free_bits(optimizer.iterations) if uses_free_bits else None,
                view_mean=view_mean,
                contrastive_weight=train.contrastive_weight,
                temperature=train.contrastive_temperature,
            )
            if scaled_loss:
                objective = optimizer.scale_loss(objective)
        gradients = tape.gradient(objective, model.trainable_variables)
        sums = tf.stack([tf.reduce_sum(loss), tf.reduce_sum(reconstruction), tf.reduce_sum(kl)])
        return gradients, tf.cast(sums, tf.float64)

    return group_gradients


def make_replica_step(worker: Worker, model, optimizer, free_bits):
    """One replica's training step on (batch, 28, 28) uint8 images and its noise seeds
    ((groups, 2) int32): each group's gradients (independent, so TensorFlow's inter-op
    threads run them side by side, one core each), summed, then the optimizer's update
    (which all-reduces across workers); returns the replica's summed (loss,
    reconstruction, kl) as float64."""
    import tensorflow as tf

    group_gradients = make_group_gradients(worker, model, optimizer, free_bits)
    size = worker.group_batch

    def replica_step(images, noise_seeds):
        parts = [group_gradients(images[g * size : (g + 1) * size], noise_seeds[g]) for g in range(worker.groups)]
        gradients = [tf.add_n(list(each)) for each in zip(*(part[0] for part in parts), strict=True)]
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return tf.add_n([part[1] for part in parts])

    return replica_step


def compile_steps(worker: Worker, strategy, model, optimizer) -> Steps:
    """The training step (`strategy.run` inside a `tf.function`; Keras 3's `model.fit`
    fails under MultiWorkerMirroredStrategy) and the two cross-worker reductions."""
    import tensorflow as tf

    config, batch = worker.config, worker.batch
    free_bits = free_bits_schedule(config, worker.steps_per_epoch)
    replica_step = make_replica_step(worker, model, optimizer, free_bits)

    # A chunk of up to `steps_per_execution` batches runs as one TensorFlow call.
    chunk_spec = tf.TensorSpec((None, batch, *IMAGE_SHAPE), tf.uint8)

    # The epoch's noise seeds start here: an int32 with room for 65,536 epochs above it, so
    # any seed the config allows (up to 2**31 - 1) fits; seeds up to 2,147 keep the value,
    # and the draws, they always had.
    seed_base = config.seed * 1_000_003 % (2**31 - 2**16)
    groups = worker.world * worker.groups  # in the whole run

    @tf.function(input_signature=[chunk_spec, tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.int32)])
    def train(chunk, epoch, first_step):
        # The sums are added across workers once an epoch, not every step.
        totals = tf.zeros(3, tf.float64)
        for i in tf.range(tf.shape(chunk)[0]):
            # One seed per group: (epoch, step * groups in the run + this group's place),
            # so a 2-worker run and a 1-worker run of 2 groups draw the same noise.
            index = (first_step + i) * groups + worker.rank * worker.groups + tf.range(worker.groups)
            noise_seeds = tf.stack([tf.fill([worker.groups], seed_base + epoch), index], axis=1)
            per_replica = strategy.run(replica_step, args=(chunk[i], noise_seeds))
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
