"""Export stage: the decoder and encoder to ONNX (tf2onnx), verified against Keras.

Output contract (ARTIFACT_DIR):
    decoder.onnx   z [batch, L] float32 -> image [batch, 28, 28, 1] float32 in [0, 1]
    encoder.onnx   image [batch, 28, 28, 1] float32 in [0, 1] -> z_mean, z_log_var [batch, L]
    model_card.json, MODEL_CARD.md, SHA256SUMS, config.json
Nothing is left behind unless every check passes. ARTIFACT_DIR must be new, empty or
an earlier export output (see pipeline.outputs).
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploy.artifact import sha256_file
from pipeline import __version__
from pipeline.atomic import atomic_directory, write_json, write_text
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.model_card import render_model_card
from pipeline.outputs import check_output
from pipeline.schema import (
    CHECKSUMS_FILE,
    CLASS_NAMES,
    CONFIG_FILE,
    DECODER_ONNX,
    ENCODER_ONNX,
    IMAGE_TENSOR_SHAPE,
    MODEL_CARD_JSON,
    MODEL_CARD_MD,
    REPORT_JSON,
    TRAIN_SUMMARY_FILE,
)

log = logging.getLogger(__name__)

VERIFY_BATCH_SIZES = (1, 7, 256)
# One at a time only the first inputs: a batch of one takes a Keras call per input (two
# thirds of the export's time at 1,000), and it checks a batch size, not more data.
VERIFY_ONE_AT_A_TIME = 100


@dataclass(frozen=True)
class ExportResult:
    out: Path
    card: dict[str, Any]


def convert(function, signature, opset: int, output_names: list[str]):
    """A tf.function -> ONNX ModelProto with named outputs."""
    import tf2onnx

    model, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=opset)
    graph_outputs = [o.name for o in model.graph.output]
    rename = dict(zip(graph_outputs, output_names, strict=True))
    for node in model.graph.node:
        node.output[:] = [rename.get(name, name) for name in node.output]
    for output in model.graph.output:
        output.name = rename[output.name]
    return model


def tf2onnx_graphs(model, opset: int):
    """What tf2onnx writes for the decoder network (z -> `decoded`, the fill's input) and
    the encoder (image -> z_mean, z_log_var), before any rewrite."""
    import tensorflow as tf

    from pipeline.onnx_fill import DECODED

    decoder, encoder = model.decoder, model.encoder

    @tf.function
    def decode(z):
        return decoder(z, training=False)

    @tf.function
    def encode(image):
        z_mean, z_log_var = encoder(image, training=False)
        return z_mean, z_log_var

    latent = tf.TensorSpec([None, model.config.latent_dim], tf.float32, name="z")
    image = tf.TensorSpec([None, *model.config.image_shape], tf.float32, name="image")
    return convert(decode, [latent], opset, [DECODED]), convert(encode, [image], opset, ["z_mean", "z_log_var"])


def onnx_models(model, opset: int):
    """Build the decoder and encoder ONNX models from a trained VAE."""
    from pipeline.onnx_cuda import cuda_refusals, make_cuda_friendly
    from pipeline.onnx_fill import append_row_fill
    from vae.config import CONTEXTS

    decoder_onnx, encoder_onnx = tf2onnx_graphs(model, opset)
    # The row fill is appended by hand: tf2onnx spent ~260 nodes on it (see onnx_fill).
    height, width, _ = model.config.image_shape
    append_row_fill(make_cuda_friendly(decoder_onnx), CONTEXTS[model.config.context], height, width,
                    model.config.likelihood)
    make_cuda_friendly(encoder_onnx)
    for name, proto in (("decoder", decoder_onnx), ("encoder", encoder_onnx)):
        refusals = cuda_refusals(proto)
        if refusals:
            raise PipelineError(f"{name}: {len(refusals)} node(s) would leave onnxruntime's CUDA provider: {refusals[0]}")
    return {
        "decoder": (decoder_onnx, row_by_row_reference(model)),
        "encoder": (encoder_onnx, lambda images, _: model.encoder(images, training=False)),
    }


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
            f"{onnx_path.name}: onnxruntime differs from Keras by {worst:.3g} "
            f"({excess:.3g} scaled) > {tolerance:g}"
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


def verification_images(data_dir: Path | None, count: int, seed: int) -> np.ndarray:
    """Test images in [0, 1] (N, 28, 28, 1): from the dataset if given, else random."""
    if data_dir is not None:
        from pipeline.dataset import read_split

        images, _ = read_split(data_dir, "test")
        if len(images) >= count:
            return images[:count, ..., None].astype(np.float32) / 255.0
        log.warning("export: the test split has %d images; topping up with random ones", len(images))
        real = images[..., None].astype(np.float32) / 255.0
    else:
        real = np.zeros((0, *IMAGE_TENSOR_SHAPE), np.float32)
    rng = np.random.default_rng(seed)
    return np.concatenate([real, rng.uniform(size=(count - len(real), *IMAGE_TENSOR_SHAPE)).astype(np.float32)])


def export(
    config: Config,
    train_dir: Path,
    out: Path,
    data_dir: Path | None = None,
    eval_dir: Path | None = None,
) -> ExportResult:
    """Run the export stage; ARTIFACT_DIR appears only if every check passes."""
    import onnx

    from pipeline.model_store import load_model

    train_dir, out = Path(train_dir), Path(out)
    check_output(out, "export")
    if data_dir is not None:
        from pipeline.dataset import check_dataset, with_dataset_section

        config = with_dataset_section(config, check_dataset(data_dir), data_dir)
    model, info = load_model(train_dir)
    evaluation = read_optional_json(eval_dir, REPORT_JSON)
    summary = read_optional_json(train_dir, TRAIN_SUMMARY_FILE)
    ex = config.export
    rng = np.random.default_rng(config.seed)
    latents = rng.standard_normal((ex.verify_samples, model.config.latent_dim)).astype(np.float32)
    images = verification_images(data_dir, ex.verify_samples, config.seed)
    metadata = artifact_metadata(model, info, summary, evaluation)
    with atomic_directory(out, "export") as tmp:
        checks = {}
        for name, (proto, reference) in onnx_models(model, ex.opset).items():
            for key, value in metadata.items():
                proto.metadata_props.add(key=key, value=value)
            proto.doc_string = f"vae-pipeline {__version__}: Fashion-MNIST VAE {name}"
            path = tmp / (DECODER_ONNX if name == "decoder" else ENCODER_ONNX)
            onnx.save(proto, str(path))
            try:
                onnx.checker.check_model(str(path), full_check=True)
            except onnx.checker.ValidationError as exc:
                raise PipelineError(f"{path.name}: ONNX checker failed: {str(exc).splitlines()[0]}") from exc
            inputs = latents if name == "decoder" else images
            checks[name] = verify(path, reference, inputs, ex.tolerance)
            log.info("export: %s verified, max |onnxruntime - keras| = %.2e", path.name, checks[name])
        generated = generated_difference(tmp / DECODER_ONNX, model.generator(), latents)
        card = model_card(model, metadata, checks, generated, evaluation, ex)
        write_json(tmp / MODEL_CARD_JSON, card)
        write_text(tmp / MODEL_CARD_MD, render_model_card(card))
        write_json(tmp / CONFIG_FILE, config.to_dict())
        write_checksums(tmp)
    return ExportResult(out, card)


def read_optional_json(directory: Path | None, name: str) -> dict[str, Any] | None:
    from pipeline.model_store import read_json

    if directory is None:
        return None
    path = Path(directory) / name
    if not path.is_file():
        raise PipelineError(f"{directory}: no {name}")
    return read_json(path)


def artifact_metadata(model, info, summary, evaluation) -> dict[str, str]:
    """String key/values stored in each ONNX file's metadata_props."""
    metadata = {
        "latent_dim": str(model.config.latent_dim),
        "image_shape": json.dumps(list(model.config.image_shape)),
        "class_names": json.dumps(CLASS_NAMES),
        "architecture": json.dumps(info["architecture"]),
        "training_run": json.dumps(
            {"epochs": info.get("epochs"), "checkpoint": (summary or {}).get("checkpoint")}
        ),
        "data_sha256": str(info.get("data_sha256")),
        "package_version": __version__,
    }
    if evaluation is not None:
        metadata["test_neg_elbo_nats"] = f"{evaluation['test']['neg_elbo']:.4f}"
    return metadata


def model_card(model, metadata, checks, generated, evaluation, export_config) -> dict[str, Any]:
    latent = model.config.latent_dim
    context = (
        ""
        if model.config.context == "none"
        else f" Each pixel's probability also depends on the pixels above it (context {model.config.context!r}): "
        "the decoder fills the image row by row, inside the ONNX graph."
    )
    likelihood = (
        " Pixels are continuous Bernoulli given z (a proper density on [0, 1]); the image is each pixel's mean."
        if model.config.likelihood == "continuous_bernoulli"
        else " Pixels are Bernoulli given z (the keras.io tutorial's likelihood); the image is each pixel's probability."
    )
    return {
        "name": "fashion-mnist-vae",
        "description": "A convolutional variational autoencoder trained on Fashion-MNIST; the decoder "
        "turns latent vectors into 28x28 greyscale images, the encoder maps images to latent Gaussians."
        + likelihood + context,
        "likelihood": model.config.likelihood,
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
            "(pipeline.onnx_cuda); not run at export",
        },
        "opset": export_config.opset,
        "verification": {
            # decoder: each row given the same rows above; encoder: its outputs
            "max_abs_difference": checks,
            "generated_max_abs_difference": generated,  # whole generated images, not checked
            "tolerance": export_config.tolerance,
            "samples": export_config.verify_samples,
            "batch_sizes": list(VERIFY_BATCH_SIZES),
            "samples_one_at_a_time": min(export_config.verify_samples, VERIFY_ONE_AT_A_TIME),
        },
        "metrics": None if evaluation is None else {
            "test_neg_elbo_nats": evaluation["test"]["neg_elbo"],
            "test_neg_iwae_nats": evaluation["test"]["neg_iwae"],
            "iwae_k": evaluation["test"]["iwae_k"],
            "knn_accuracy": evaluation["clustering"]["knn_accuracy"],
            "active_units": evaluation["posterior"]["active_units"],
        },
        "metadata": metadata,
        "versions": {"pipeline": __version__, "python": platform.python_version()},
    }


def write_checksums(directory: Path) -> None:
    """SHA256SUMS over every other file, in `sha256sum -c` format."""
    lines = [
        f"{sha256_file(path)}  {path.name}\n"
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != CHECKSUMS_FILE
    ]
    write_text(directory / CHECKSUMS_FILE, "".join(lines))
