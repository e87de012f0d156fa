"""Run the exported VAE with onnxruntime and numpy only.

    from deploy import Generator
    generator = Generator("artifacts/")
    images = generator.sample(16, seed=0)

`import deploy` and `deploy.Generator` need onnxruntime and numpy alone: never
TensorFlow, Keras, Ray or the training code (`pipeline`, `vae`). The HTTP service,
`deploy.serve` and `deploy.serve_process` (the `serve` extra), runs the same Generator
in Ray Serve: those two modules, and only they, import Ray.
"""

from typing import Any

from deploy.artifact import ArtifactError, verify_checksums

__all__ = ["ArtifactError", "Generator", "verify_checksums"]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    # Generator loads onnxruntime: only when asked for, so that the artifact's names
    # (deploy.artifact, which the pipeline shares) cost nothing to import.
    if name == "Generator":
        from deploy.generator import Generator

        return Generator
    raise AttributeError(f"module 'deploy' has no attribute {name!r}")
