"""Run the exported VAE with onnxruntime and numpy only.

    from deploy import Generator
    generator = Generator("artifacts/")
    images = generator.sample(16, seed=0)

This package never imports TensorFlow, Keras, Ray or the training code.
"""

from deploy.artifact import ArtifactError, verify_checksums
from deploy.generator import Generator

__all__ = ["ArtifactError", "Generator", "verify_checksums"]
__version__ = "0.1.0"
