"""The per-step schedules of training: the batch each worker takes, the learning rate,
and the free-bits floor."""

from __future__ import annotations

from pipeline.config import Config


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
