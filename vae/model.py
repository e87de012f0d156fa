"""Encoder, sampling layer, decoder and the thin VAE model that joins them."""

from __future__ import annotations

import keras
from keras import layers, ops

# Modules, not names: importing vae.objective or vae.context first loads Keras, whose
# import hook (vae/__init__.py) imports this module while they are still half-made.
from vae import context as pixel_context
from vae import objective
from vae.config import VAEConfig


@keras.saving.register_keras_serializable(package="vae")
class Sampling(layers.Layer):
    """Reparameterised draw z = mean + exp(log_var / 2) * eps, eps ~ N(0, I).

    The noise comes from the layer's own `SeedGenerator`, so a model built with
    the same seed draws the same sequence of samples.
    """

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed_generator")

    def call(self, inputs):
        z_mean, z_log_var = inputs
        eps = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator, dtype=z_mean.dtype)
        return objective.reparameterize(z_mean, z_log_var, eps)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def build_encoder(config: VAEConfig) -> keras.Model:
    """images (N, H, W, C) in [0, 1] -> [z_mean (N, L), z_log_var (N, L)]."""
    images = keras.Input(shape=config.image_shape, name="image")
    x = images
    for stage, filters in enumerate(config.filters, start=1):
        x = layers.Conv2D(
            filters, 3, strides=2, padding="same", activation=config.activation, name=f"encoder_conv{stage}_1"
        )(x)
        for i in range(2, (config.encoder_convs_per_stage or config.convs_per_stage) + 1):
            x = layers.Conv2D(
                filters, 3, padding="same", activation=config.activation, name=f"encoder_conv{stage}_{i}"
            )(x)
    x = layers.Flatten(name="encoder_flatten")(x)  # (N, H/4 * W/4 * filters[-1])
    x = layers.Dense(config.dense_units, activation=config.activation, name="encoder_dense")(x)
    # The heads stay float32 under mixed precision: exp(log_var) overflows in float16.
    z_mean = layers.Dense(config.latent_dim, name="z_mean", dtype="float32")(x)
    z_log_var = layers.Dense(config.latent_dim, name="z_log_var", dtype="float32")(x)
    return keras.Model(images, [z_mean, z_log_var], name="encoder")


@keras.saving.register_keras_serializable(package="vae")
class ContextFill(layers.Layer):
    """Decoder output -> pixel means, row by row when there is a pixel context."""

    def __init__(self, context: str = "none", likelihood: str = "bernoulli", **kwargs):
        super().__init__(**kwargs)
        self.context, self.likelihood = context, likelihood
        self.offsets = pixel_context.context_offsets(context)

    def call(self, decoded):
        return pixel_context.fill_rows(decoded, self.offsets, self.likelihood)

    def get_config(self):
        return {**super().get_config(), "context": self.context, "likelihood": self.likelihood}


def build_decoder(config: VAEConfig) -> keras.Model:
    """z (N, L) -> Bernoulli logits (N, H, W, C), float32; with a pixel context, base
    logits and the context weights (N, H, W, 1 + K)."""
    height, width, channels = config.image_shape
    z = keras.Input(shape=(config.latent_dim,), name="z")
    widths = config.decoder_filters or config.filters
    base = (height // 4, width // 4, widths[-1])
    x = layers.Dense(base[0] * base[1] * base[2], activation=config.activation, name="decoder_dense")(z)
    x = layers.Reshape(base, name="decoder_reshape")(x)  # (N, H/4, W/4, widths[-1])
    for stage, filters in enumerate(reversed(widths), start=1):
        x = layers.Conv2DTranspose(
            filters, 3, strides=2, padding="same", activation=config.activation, name=f"decoder_upconv{stage}"
        )(x)
        for i in range(2, config.convs_per_stage + 1):
            x = layers.Conv2D(
                filters, 3, padding="same", activation=config.activation, name=f"decoder_conv{stage}_{i}"
            )(x)
    outputs = channels + len(pixel_context.context_offsets(config.context))
    logits = layers.Conv2DTranspose(outputs, 3, padding="same", name="logits", dtype="float32")(x)
    return keras.Model(z, logits, name="decoder")


def probability_decoder(decoder: keras.Model, context: str = "none", likelihood: str = "bernoulli") -> keras.Model:
    """Wrap a decoder into z (N, L) -> pixel means (N, H, W, C) in [0, 1] (generated row
    by row when the decoder has a pixel `context`)."""
    z = keras.Input(shape=decoder.input_shape[1:], name="z")
    image = ContextFill(context, likelihood, name="image", dtype="float32")(decoder(z))
    return keras.Model(z, image, name="generator")


@keras.saving.register_keras_serializable(package="vae")
class VAE(keras.Model):
    """Encoder + sampling + decoder; `call` returns (z_mean, z_log_var, logits).

    Every layer has a fixed name, so variable paths (`encoder_dense/kernel`, ...) are
    the same in every process, and the model saves to Keras's `.keras` format:
    `keras.saving.load_model` opens it once this module is imported (see `vae/__init__.py`).
    """

    def __init__(self, config: VAEConfig | dict, seed: int | None = None, **kwargs):
        kwargs.setdefault("name", "vae")
        super().__init__(**kwargs)
        self.config = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
        self.seed = seed
        self.encoder = build_encoder(self.config)
        self.decoder = build_decoder(self.config)
        self.sampling = Sampling(seed=seed, name="sampling")

    def get_config(self):
        return {"name": self.name, "config": self.config.to_dict(), "seed": self.seed}

    def build(self, input_shape=None):
        """Create every variable (a loaded model needs them before its weights are set)."""
        self.call(ops.zeros((1, *self.config.image_shape)))
        self.built = True

    def call(self, images, training: bool = False, eps=None):
        """images (N, H, W, C) -> (z_mean, z_log_var, logits).

        `eps` (N, L) replaces the layer's own noise; distributed training passes
        per-replica noise this way, so no random state is shared between replicas.
        """
        z_mean, z_log_var = self.encoder(images, training=training)
        if eps is None:
            z = self.sampling([z_mean, z_log_var])
        else:
            z = objective.reparameterize(z_mean, z_log_var, eps)
        return z_mean, z_log_var, self.logits(z, images, training=training)

    def logits(self, z, images, training: bool = False):
        """Bernoulli logits (N, H, W, C) of `images` given latents z (N, L); with a pixel
        context each pixel also sees the true pixels above it."""
        return pixel_context.context_logits(
            self.decoder(z, training=training), images, pixel_context.context_offsets(self.config.context)
        )

    def generator(self) -> keras.Model:
        """z (N, L) -> pixel probabilities (N, H, W, C): what export ships as the decoder."""
        return probability_decoder(self.decoder, self.config.context, self.config.likelihood)

    def losses_per_example(self, images, training: bool = False, eps=None):
        """(loss, reconstruction, kl) per example, each (N,), in nats."""
        z_mean, z_log_var, logits = self(images, training=training, eps=eps)
        return objective.neg_elbo(
            images, logits, z_mean, z_log_var, beta=self.config.beta, likelihood=self.config.likelihood
        )


def build_vae(config: VAEConfig, seed: int | None = None) -> VAE:
    """A VAE with its variables created (so weights can be set straight away)."""
    model = VAE(config, seed=seed)
    model.build()
    return model
