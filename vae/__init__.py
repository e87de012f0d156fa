"""A Keras 3 convolutional VAE for 28x28 greyscale images, and its bounds.

Pure model code: no Ray, no file paths, no command line.
"""

from vae.config import VAEConfig, preset
from vae.model import (
    VAE,
    ContextFill,
    Sampling,
    build_decoder,
    build_encoder,
    build_vae,
    probability_decoder,
)
from vae.objective import (
    bernoulli_log_likelihood,
    free_bits_kl,
    gaussian_log_density,
    iwae_bound,
    kl_divergence,
    kl_per_dimension,
    neg_elbo,
    reparameterize,
)
from vae.state import get_state, set_state

__all__ = [
    "VAE",
    "ContextFill",
    "Sampling",
    "VAEConfig",
    "bernoulli_log_likelihood",
    "build_decoder",
    "build_encoder",
    "build_vae",
    "gaussian_log_density",
    "get_state",
    "iwae_bound",
    "free_bits_kl",
    "kl_divergence",
    "kl_per_dimension",
    "neg_elbo",
    "preset",
    "probability_decoder",
    "reparameterize",
    "set_state",
]
