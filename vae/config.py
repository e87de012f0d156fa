"""The architecture of a VAE as a small frozen dataclass, and the named presets.

The one definition of what a valid architecture is: the pipeline validates its model
section by building a `VAEConfig`. Imports without Keras. Each error message starts
with the field's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Convolution widths beyond this fill memory long before they help a 28x28 image.
MAX_WIDTH = 1024
ACTIVATIONS = ("relu", "elu", "gelu", "swish")
# Pixel likelihoods (see vae.objective): the Bernoulli of the keras.io tutorial, which is not
# a density on grey pixels, and the continuous Bernoulli, which is.
LIKELIHOODS = ("bernoulli", "continuous_bernoulli")
# Pixel contexts (see vae.context): name -> offsets (row, column) of the context pixels,
# each in an earlier row.
CONTEXTS: dict[str, tuple[tuple[int, int], ...]] = {
    "none": (),
    "above": ((-1, 0),),
    "rows": ((-1, -1), (-1, 0), (-1, 1), (-2, 0)),
}


@dataclass(frozen=True)
class VAEConfig:
    """Everything needed to rebuild a model (weights aside).

    The encoder has one stage per entry of `filters`: a stride-2 3x3 convolution
    followed by `encoder_convs_per_stage - 1` stride-1 ones (None: `convs_per_stage`),
    then a dense layer of `dense_units` and the two latent heads. The decoder mirrors it
    with transposed convolutions, `decoder_filters` wide (None: `filters`), and ends in a
    3x3 transposed convolution giving one Bernoulli logit per pixel, or with a pixel
    `context` (see vae.context) a base logit and one weight per context pixel in the
    rows above.
    """

    latent_dim: int = 2
    filters: tuple[int, ...] = (32, 64)
    convs_per_stage: int = 1
    encoder_convs_per_stage: int | None = None  # the encoder's own depth (None: convs_per_stage)
    decoder_filters: tuple[int, ...] | None = None  # the decoder's own widths (None: filters)
    dense_units: int = 16
    activation: str = "relu"
    beta: float = 1.0
    context: str = "none"  # pixel context from the rows above: "none", "above" or "rows"
    likelihood: str = "bernoulli"  # of each pixel given z (and the context): see LIKELIHOODS
    image_shape: tuple[int, int, int] = (28, 28, 1)

    def __post_init__(self) -> None:
        pixels = self.image_shape[0] * self.image_shape[1] * self.image_shape[2]
        if not 1 <= self.latent_dim <= pixels:
            # More latent dimensions than pixel values describes nothing more; it only fills memory.
            raise ValueError(f"latent_dim must be >= 1 and <= {pixels} (the pixels of an image), got {self.latent_dim}")
        for name, widths in (("filters", self.filters), ("decoder_filters", self.decoder_filters)):
            if widths is not None and (len(widths) != 2 or not 1 <= min(widths) <= max(widths) <= MAX_WIDTH):
                raise ValueError(f"{name} must be two integers from 1 to {MAX_WIDTH}, got {widths}")
        if self.convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be >= 1, got {self.convs_per_stage}")
        if self.encoder_convs_per_stage is not None and self.encoder_convs_per_stage < 1:
            raise ValueError(f"encoder_convs_per_stage must be >= 1, got {self.encoder_convs_per_stage}")
        if not 1 <= self.dense_units <= MAX_WIDTH * 16:
            raise ValueError(f"dense_units must be >= 1 and <= {MAX_WIDTH * 16}, got {self.dense_units}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not 0 < self.beta <= 1000:
            raise ValueError(f"beta must be > 0 and <= 1000, got {self.beta}")
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {sorted(CONTEXTS)}, got {self.context!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.context != "none" and self.image_shape[2] != 1:
            raise ValueError(f"context {self.context!r} needs single-channel images, got {self.image_shape}")
        if self.image_shape[0] % 4 or self.image_shape[1] % 4:
            raise ValueError(f"image_shape height and width must be multiples of 4, got {self.image_shape}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown VAEConfig field {unknown[0]!r}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


PRESETS: dict[str, VAEConfig] = {
    # The classic keras.io VAE tutorial, layer for layer.
    "seed": VAEConfig(),
    # The tutorial's encoder convolutions with a 16-wide latent, a 256-wide dense layer,
    # swish activations, a decoder 32 wide at both stages and the four pixels of the two
    # rows above as context: see docs/benchmarks.md for the measured test ELBO, latent
    # clustering and decoding speed behind each.
    "default": VAEConfig(
        latent_dim=16,
        filters=(32, 64),
        convs_per_stage=1,
        decoder_filters=(32, 32),
        dense_units=256,
        activation="swish",
        context="rows",
    ),
}


def preset(name: str) -> VAEConfig:
    """The named preset's architecture; ValueError for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]
