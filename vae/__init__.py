"""A Keras 3 convolutional VAE for 28x28 greyscale images, and its bounds.

Pure model code: no Ray, no file paths, no command line. `vae.config` (the
architecture and its presets) imports without Keras; the names below load their
modules, and with them Keras and TensorFlow, on first use.

`import vae` also makes a saved model open with plain Keras:
`keras.saving.load_model("vae.keras")` needs the model's classes registered, so they
are registered as soon as Keras is loaded, whichever of the two is imported first.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

_EXPORTS = {
    "VAEConfig": "vae.config",
    "preset": "vae.config",
    "augment": "vae.augment",
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


class _RegisterWithKeras(importlib.abc.MetaPathFinder):
    """Imports `vae.model` (which registers VAE and its layers with Keras's
    serialization) right after `keras` finishes importing.

    It stays in place until Keras is really imported: a mere `find_spec("keras")` (a
    library probing whether Keras is installed) gets a spec that is never run.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "keras":
            return None
        others = [finder for finder in sys.meta_path if finder is not self and hasattr(finder, "find_spec")]
        spec = next((s for s in (finder.find_spec(name, path, target) for finder in others) if s is not None), None)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            importlib.import_module("vae.model")

        spec.loader.exec_module = exec_module
        return spec


if "keras" in sys.modules:
    importlib.import_module("vae.model")
elif not any(isinstance(finder, _RegisterWithKeras) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithKeras())
