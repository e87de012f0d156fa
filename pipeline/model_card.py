"""The Markdown model card, rendered from the model_card.json dict."""

from __future__ import annotations

from typing import Any


def render_model_card(card: dict[str, Any]) -> str:
    latent = card["latent_dim"]
    metrics = card.get("metrics")
    metric_lines = (
        "Not evaluated (run `vae-pipeline evaluate` and export with `--report`)."
        if metrics is None
        else "\n".join(f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}"
                       for key, value in metrics.items())
    )
    checks = card["verification"]
    providers = "\n".join(f"- {name}: {what}" for name, what in card.get("execution_providers", {}).items())
    return f"""# Fashion-MNIST VAE (ONNX)

{card['description']}

## Files

| file | input | output |
| --- | --- | --- |
| decoder.onnx | `z` float32 [batch, {latent}] | `image` float32 [batch, 28, 28, 1], pixel means in [0, 1] ({card.get('likelihood', 'bernoulli').replace('_', ' ')}) |
| encoder.onnx | `image` float32 [batch, 28, 28, 1] in [0, 1] | `z_mean`, `z_log_var` float32 [batch, {latent}] |

The batch dimension is dynamic. ONNX opset {card['opset']}. `SHA256SUMS` lists every file's hash.

## Metrics (test split, nats per image)

{metric_lines}

## Verification

onnxruntime matched Keras to at most {max(checks['max_abs_difference'].values()):.2e}
(tolerance {checks['tolerance']:g}) on {checks['samples']} inputs at batch sizes {checks['batch_sizes'][1:]}
and the first {checks.get('samples_one_at_a_time', checks['samples'])} one at a time;
the decoder row by row, given the same rows above. Whole generated images differ by at most
{checks['generated_max_abs_difference']:.2e}: the row-by-row fill carries small differences down the image.

Execution providers:
{providers}

## How to call it

```python
from deploy import Generator

generator = Generator("ARTIFACT_DIR")          # checks SHA256SUMS, picks CUDA if available
images = generator.sample(16, seed=0)           # (16, 28, 28, 1) float32 in [0, 1]
z_mean, z_log_var = generator.encode(images)    # (16, {latent}) each
```

Or with onnxruntime alone:

```python
import numpy as np, onnxruntime as ort

session = ort.InferenceSession("decoder.onnx", providers=["CPUExecutionProvider"])
images = session.run(["image"], {{"z": np.random.randn(16, {latent}).astype(np.float32)}})[0]
```

Classes: {", ".join(card['class_names'])}.
"""
