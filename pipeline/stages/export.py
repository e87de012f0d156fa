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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploy.artifact import sha256_file
from pipeline import __version__
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.files import read_json, write_json, write_text
from pipeline.onnx.convert import onnx_models
from pipeline.onnx.parity import (
    generated_difference,
    row_by_row_reference,
    verification_record,
    verify,
)
from pipeline.outputs import check_output, stage_output
from pipeline.report.model_card import build_model_card, render_model_card
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
from pipeline.stages import StageRun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    out: Path
    card: dict[str, Any]


def verification_images(data_dir: Path | None, count: int, seed: int) -> np.ndarray:
    """Test images in [0, 1] (N, 28, 28, 1): from the dataset if given, else random."""
    if data_dir is not None:
        from pipeline.data.dataset import read_split

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

    from pipeline.training.model_store import load_model

    train_dir, out = Path(train_dir), Path(out)
    check_output(out, "export")
    if data_dir is not None:
        from pipeline.data.dataset import check_dataset, with_dataset_section

        config = with_dataset_section(config, check_dataset(data_dir), data_dir)
    model, info = load_model(train_dir)
    evaluation = read_optional_json(eval_dir, REPORT_JSON)
    summary = read_optional_json(train_dir, TRAIN_SUMMARY_FILE)
    ex = config.export
    rng = np.random.default_rng(config.seed)
    latents = rng.standard_normal((ex.verify_samples, model.config.latent_dim)).astype(np.float32)
    images = verification_images(data_dir, ex.verify_samples, config.seed)
    metadata = artifact_metadata(model, info, summary, evaluation)
    with stage_output(out, "export") as tmp:
        checks = {}
        for name, (proto, reference) in onnx_models(model, ex.opset, row_by_row_reference(model)).items():
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
        verification = verification_record(checks, generated, ex.tolerance, ex.verify_samples)
        card = build_model_card(model.config, metadata, verification, evaluation, ex.opset)
        write_json(tmp / MODEL_CARD_JSON, card)
        write_text(tmp / MODEL_CARD_MD, render_model_card(card))
        write_json(tmp / CONFIG_FILE, config.to_dict())
        write_checksums(tmp)
    return ExportResult(out, card)


def read_optional_json(directory: Path | None, name: str) -> dict[str, Any] | None:
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
        "training_run": json.dumps({"epochs": info.get("epochs"), "checkpoint": (summary or {}).get("checkpoint")}),
        "data_sha256": str(info.get("data_sha256")),
        "package_version": __version__,
    }
    if evaluation is not None:
        metadata["test_neg_elbo_nats"] = f"{evaluation['test']['neg_elbo']:.4f}"
    return metadata


def write_checksums(directory: Path) -> None:
    """SHA256SUMS over every other file, in `sha256sum -c` format."""
    lines = [
        f"{sha256_file(path)}  {path.name}\n"
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != CHECKSUMS_FILE
    ]
    write_text(directory / CHECKSUMS_FILE, "".join(lines))


def run_in(run: StageRun) -> None:
    export(
        run.config,
        run.directory("train"),
        run.directory("export"),
        data_dir=run.directory("ingest"),
        eval_dir=run.directory("evaluate"),
    )


def check_done(directory: Path) -> None:
    """Every file still matches SHA256SUMS."""
    from deploy.artifact import ArtifactError, verify_checksums

    try:
        verify_checksums(directory)
    except ArtifactError as exc:
        raise PipelineError(str(exc)) from exc
