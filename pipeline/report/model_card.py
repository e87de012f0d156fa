"""The model card: `model_card.json` (the facts) built from the export's checks and the
evaluation, and `MODEL_CARD.md` rendered from it."""

from __future__ import annotations

import platform
from typing import Any

from pipeline import __version__
from pipeline.schema import (
    CLASS_NAMES,
    DECODER_ONNX,
    ENCODER_ONNX,
    IMAGE_HEIGHT,
    IMAGE_TENSOR_SHAPE,
    IMAGE_WIDTH,
)
from vae.config import VAEConfig


def describe(architecture: VAEConfig) -> str:
    """The card's description: what the model is, its likelihood and its pixel context."""
    context = (
        ""
        if architecture.context == "none"
        else f" Each pixel's probability also depends on the pixels above it (context {architecture.context!r}): "
        "the decoder fills the image row by row, inside the ONNX graph."
    )
    likelihood = (
        " Pixels are continuous Bernoulli given z (a proper density on [0, 1]); the image is each pixel's mean."
        if architecture.likelihood == "continuous_bernoulli"
        else " Pixels are Bernoulli given z (the keras.io tutorial's likelihood); "
        "the image is each pixel's probability."
    )
    return (
        "A convolutional variational autoencoder trained on Fashion-MNIST; the decoder "
        f"turns latent vectors into {IMAGE_HEIGHT}x{IMAGE_WIDTH} greyscale images, "
        "the encoder maps images to latent Gaussians." + likelihood + context
    )


def build_model_card(
    architecture: VAEConfig,
    metadata: dict[str, str],
    verification: dict[str, Any],
    evaluation: dict[str, Any] | None,
    opset: int,
) -> dict[str, Any]:
    """model_card.json: what the files take and give, how they were checked, the test
    metrics (`evaluation`, a report.json, or None) and the versions."""
    latent = architecture.latent_dim
    return {
        "name": "fashion-mnist-vae",
        "description": describe(architecture),
        "likelihood": architecture.likelihood,
        "files": {
            DECODER_ONNX: {
                "inputs": {"z": {"shape": ["batch", latent], "dtype": "float32"}},
                "outputs": {"image": {"shape": ["batch", *IMAGE_TENSOR_SHAPE], "dtype": "float32", "range": [0, 1]}},
            },
            ENCODER_ONNX: {
                "inputs": {"image": {"shape": ["batch", *IMAGE_TENSOR_SHAPE], "dtype": "float32", "range": [0, 1]}},
                "outputs": {
                    "z_mean": {"shape": ["batch", latent], "dtype": "float32"},
                    "z_log_var": {"shape": ["batch", latent], "dtype": "float32"},
                },
            },
        },
        "latent_dim": latent,
        "class_names": list(CLASS_NAMES),
        "execution_providers": {
            "CPUExecutionProvider": "run and verified against Keras at export",
            "CUDAExecutionProvider": "graph checked at export: no node the CUDA provider refuses "
            "(pipeline.onnx.cuda); not run at export",
        },
        "opset": opset,
        "verification": verification,
        "metrics": None
        if evaluation is None
        else {
            "test_neg_elbo_nats": evaluation["test"]["neg_elbo"],
            "test_neg_iwae_nats": evaluation["test"]["neg_iwae"],
            "iwae_k": evaluation["test"]["iwae_k"],
            "knn_accuracy": evaluation["clustering"]["knn_accuracy"],
            "active_units": evaluation["posterior"]["active_units"],
        },
        "metadata": metadata,
        "versions": {"pipeline": __version__, "python": platform.python_version()},
    }


def render_metrics(metrics: dict[str, Any] | None) -> str:
    if metrics is None:
        return "Not evaluated (run `vae-pipeline evaluate` and export with `--report`)."
    return "\n".join(
        f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}" for key, value in metrics.items()
    )


def render_model_card(card: dict[str, Any]) -> str:
    """MODEL_CARD.md, from a `build_model_card` dict."""
    latent = card["latent_dim"]
    shape = ", ".join(map(str, IMAGE_TENSOR_SHAPE))
    likelihood = card.get("likelihood", "bernoulli").replace("_", " ")
    metric_lines = render_metrics(card.get("metrics"))
    checks = card["verification"]
    providers = "\n".join(f"- {name}: {what}" for name, what in card.get("execution_providers", {}).items())
    return f"""# Fashion-MNIST VAE (ONNX)

{card["description"]}

## Files

| file | input | output |
| --- | --- | --- |
| decoder.onnx | `z` float32 [batch, {latent}] | `image` float32 [batch, {shape}], means in [0, 1] ({likelihood}) |
| encoder.onnx | `image` float32 [batch, {shape}] in [0, 1] | `z_mean`, `z_log_var` float32 [batch, {latent}] |

The batch dimension is dynamic. ONNX opset {card["opset"]}. `SHA256SUMS` lists every file's hash.

## Metrics (test split, nats per image)

{metric_lines}

## Verification

onnxruntime matched Keras to at most {max(checks["max_abs_difference"].values()):.2e}
(tolerance {checks["tolerance"]:g}) on {checks["samples"]} inputs at batch sizes {checks["batch_sizes"][1:]}
and the first {checks.get("samples_one_at_a_time", checks["samples"])} one at a time;
the decoder row by row, given the same rows above. Whole generated images differ by at most
{checks["generated_max_abs_difference"]:.2e}: the row-by-row fill carries small differences down the image.

Execution providers:
{providers}

## How to call it

```python
from deploy import Generator

generator = Generator("ARTIFACT_DIR")          # checks SHA256SUMS, picks CUDA if available
images = generator.sample(16, seed=0)           # (16, {shape}) float32 in [0, 1]
z_mean, z_log_var = generator.encode(images)    # (16, {latent}) each
```

Or with onnxruntime alone:

```python
import numpy as np, onnxruntime as ort

session = ort.InferenceSession("decoder.onnx", providers=["CPUExecutionProvider"])
images = session.run(["image"], {{"z": np.random.randn(16, {latent}).astype(np.float32)}})[0]
```

Classes: {", ".join(card["class_names"])}.
"""
