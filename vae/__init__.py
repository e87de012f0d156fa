"""A Keras 3 convolutional VAE for 28x28 greyscale images, and its bounds.

Pure model code: no Ray, no file paths, no command line. `vae.config` (the
architecture and its presets) imports without Keras; the names below load their
modules, and with them Keras and TensorFlow, on first use.

A saved model opens with plain Keras once `vae.model` is imported, which registers the
model's classes with Keras's serialization:

    import keras
    import vae.model  # registers VAE, Sampling and ContextFill
    model = keras.saving.load_model("vae.keras", compile=False)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VAEConfig": "vae.config",
    "preset": "vae.config",
    "augment": "vae.augment",
    "random_view": "vae.augment",
    "VAE": "vae.model",
    "ContextFill": "vae.model",
    "Sampling": "vae.model",
    "build_decoder": "vae.model",
    "build_encoder": "vae.model",
    "build_vae": "vae.model",
    "probability_decoder": "vae.model",
    "bernoulli_log_likelihood": "vae.objective",
    "continuous_bernoulli_log_likelihood": "vae.objective",
    "log_likelihood": "vae.objective",
    "pixel_mean": "vae.objective",
    "free_bits_kl": "vae.objective",
    "gaussian_log_density": "vae.objective",
    "info_nce": "vae.objective",
    "iwae_bound": "vae.objective",
    "kl_divergence": "vae.objective",
    "kl_per_dimension": "vae.objective",
    "neg_elbo": "vae.objective",
    "reparameterize": "vae.objective",
    "training_objective": "vae.objective",
    "get_state": "vae.state",
    "set_state": "vae.state",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
