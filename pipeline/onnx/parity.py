"""ONNX against Keras: every output of the exported files checked on the same inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

VERIFY_BATCH_SIZES = (1, 7, 256)
# One at a time only the first inputs: a batch of one takes a Keras call per input (two
# thirds of the export's time at 1,000), and it checks a batch size, not more data.
VERIFY_ONE_AT_A_TIME = 100


def verify(onnx_path: Path, reference, inputs: np.ndarray, tolerance: float) -> float:
    """Max |onnxruntime - Keras| over `inputs` at every verification batch size, where
    `reference(chunk, onnx_outputs)` gives the Keras values for a chunk.

    Each element must agree within `tolerance * max(1, |keras value|)`: absolute for
    the decoder's pixels in [0, 1]; relative for encoder outputs beyond 1 in size,
    where float32 itself cannot resolve 1e-5 absolute. Returns the largest absolute
    difference; PipelineError when any element is out of tolerance.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    worst, excess = 0.0, 0.0
    for batch in VERIFY_BATCH_SIZES:
        count = min(len(inputs), VERIFY_ONE_AT_A_TIME) if batch == 1 else len(inputs)
        for start in range(0, count, batch):
            chunk = inputs[start : start + batch]
            got = session.run(None, {input_name: chunk})
            expected = reference(chunk, got)
            expected = [np.asarray(e) for e in (expected if isinstance(expected, (list, tuple)) else [expected])]
            for e, g in zip(expected, got, strict=True):
                if e.shape != g.shape:
                    raise PipelineError(f"{onnx_path.name}: output shape {g.shape}, Keras gives {e.shape}")
                if not (np.isfinite(e).all() and np.isfinite(g).all()):
                    raise PipelineError(f"{onnx_path.name}: the model gives NaN or Inf outputs; not exported")
                difference = np.abs(e - g)
                worst = max(worst, float(np.max(difference)))
                excess = max(excess, float(np.max(difference / np.maximum(1.0, np.abs(e)))))
    if excess > tolerance:
        raise PipelineError(
            f"{onnx_path.name}: onnxruntime differs from Keras by {worst:.3g} ({excess:.3g} scaled) > {tolerance:g}"
        )
    return worst


def row_by_row_reference(model):
    """The decoder's reference: Keras's pixel probabilities for every row given the same
    rows above as onnxruntime's output.

    Generation fills each row from the rows above, so a float difference in one row moves
    every row below it (about 600x by the last row for the default model). Checking each
    row against Keras *given the same rows above* tests every step of the fill at full
    precision; without a pixel context it is the plain decoder output.
    """
    from vae import pixel_mean

    return lambda z, outputs: pixel_mean(model.logits(z, outputs[0]), model.config.likelihood)


def generated_difference(onnx_path: Path, generator, latents: np.ndarray) -> float:
    """Max |onnxruntime - Keras| of the generated images themselves (recorded, not checked)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: latents})[0]
    difference = float(np.max(np.abs(got - np.asarray(generator(latents, training=False)))))
    if not np.isfinite(difference):
        raise PipelineError(f"{onnx_path.name}: generated images hold NaN or Inf; not exported")
    return difference


def verification_record(checks: dict[str, float], generated: float, tolerance: float, samples: int) -> dict[str, Any]:
    """What the model card says of the checks: the largest differences, and how they were made."""
    return {
        # decoder: each row given the same rows above; encoder: its outputs
        "max_abs_difference": checks,
        "generated_max_abs_difference": generated,  # whole generated images, not checked
        "tolerance": tolerance,
        "samples": samples,
        "batch_sizes": list(VERIFY_BATCH_SIZES),
        "samples_one_at_a_time": min(samples, VERIFY_ONE_AT_A_TIME),
    }
