"""A Keras 3 convolutional VAE for 28x28 greyscale images, and its bounds.

Pure model code: no Ray, no file paths, no command line.
"""

from vae.config import VAEConfig, preset
from vae.model import VAE, Sampling, build_decoder, build_encoder, build_vae, probability_decoder
from vae.objective import (
    bernoulli_log_likelihood,
    gaussian_log_density,
    iwae_bound,
    kl_divergence,
    neg_elbo,
    reparameterize,
)
from vae.state import get_state, set_state

__all__ = [
    "VAE",
    "Sampling",
    "VAEConfig",
    "bernoulli_log_likelihood",
    "build_decoder",
    "build_encoder",
    "build_vae",
    "gaussian_log_density",
    "get_state",
    "iwae_bound",
    "kl_divergence",
    "neg_elbo",
    "preset",
    "probability_decoder",
    "reparameterize",
    "set_state",
]
