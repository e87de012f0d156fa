import json

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.export import export, row_by_row_reference, verify
from pipeline.schema import CHECKSUMS_FILE


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, small_dataset, trained_run):
    out = tmp_path_factory.mktemp("artifact") / "artifact"
    return export(load_config(), trained_run.out, out, data_dir=small_dataset)


def test_artifact_files_and_checksums(artifact):
    names = sorted(p.name for p in artifact.out.iterdir())
    assert names == ["MODEL_CARD.md", "SHA256SUMS", "config.json", "decoder.onnx", "encoder.onnx", "model_card.json"]
    listed = [line.split("  ")[1] for line in (artifact.out / CHECKSUMS_FILE).read_text().splitlines()]
    assert sorted(listed) == sorted(n for n in names if n != CHECKSUMS_FILE)


def test_onnx_models_have_contract_io_opset_and_metadata(artifact):
    import onnx

    decoder = onnx.load(str(artifact.out / "decoder.onnx"))
    assert [i.name for i in decoder.graph.input] == ["z"]
    assert [o.name for o in decoder.graph.output] == ["image"]
    dims = decoder.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and dims[1].dim_value == 4
    assert max(o.version for o in decoder.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = {p.key: p.value for p in decoder.metadata_props}
    assert meta["latent_dim"] == "4" and json.loads(meta["class_names"])[0] == "T-shirt/top"
    assert len(meta["data_sha256"]) == 64
    encoder = onnx.load(str(artifact.out / "encoder.onnx"))
    assert [o.name for o in encoder.graph.output] == ["z_mean", "z_log_var"]


def test_verification_is_recorded_within_tolerance(artifact):
    checks = artifact.card["verification"]
    assert set(checks["max_abs_difference"]) == {"decoder", "encoder"}
    assert checks["max_abs_difference"]["decoder"] <= 1e-5  # pixels: absolute, row by row
    assert checks["max_abs_difference"]["encoder"] < 1e-4  # within 1e-5 relative to |value|
    assert 0 <= checks["generated_max_abs_difference"] < 1e-2  # whole images: recorded only
    assert checks["tolerance"] == 1e-5
    assert checks["samples"] >= 1000 and checks["batch_sizes"] == [1, 7, 256]


def test_verify_rejects_a_model_that_differs(artifact, trained_run):
    from pipeline.model_store import load_model

    model, _ = load_model(trained_run.out)
    z = np.random.default_rng(0).standard_normal((256, 4)).astype(np.float32)

    def shifted(x, outputs):
        return np.asarray(model.generator()(x)) + 1e-3

    with pytest.raises(PipelineError, match="differs from Keras"):
        verify(artifact.out / "decoder.onnx", shifted, z, tolerance=1e-5)


def test_row_by_row_reference_checks_each_row_given_the_rows_above(trained_run):
    from pipeline.model_store import load_model

    model, _ = load_model(trained_run.out)
    reference = row_by_row_reference(model)
    z = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    generated = np.asarray(model.generator()(z))
    # Keras's own fill is the fixed point: every row is what the rows above give.
    np.testing.assert_allclose(np.asarray(reference(z, [generated])), generated, atol=1e-5)
    # A change to row 10 shows up in row 10 itself, not only in the rows it feeds.
    wrong = generated.copy()
    wrong[:, 10] = np.clip(wrong[:, 10] + 0.01, 0, 1)
    residual = np.abs(np.asarray(reference(z, [wrong])) - wrong).max(axis=(0, 2, 3))
    assert residual[:10].max() < 1e-5 and residual[10] > 5e-3


def test_failed_export_leaves_no_artifact(tmp_path, trained_run):
    out = tmp_path / "artifact"
    with pytest.raises(PipelineError):
        export(load_config(overrides=["export.tolerance=1e-30"]), trained_run.out, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="no trained model"):
        export(load_config(), tmp_path / "nothing", tmp_path / "artifact")
