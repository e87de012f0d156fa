import json

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.onnx.parity import row_by_row_reference, verify
from pipeline.schema import CHECKSUMS_FILE
from pipeline.stages.export import export


def test_artifact_files_and_checksums(artifact):
    names = sorted(p.name for p in artifact.out.iterdir() if p.name != ".vae-pipeline.json")
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
    assert checks["samples"] >= 1000 and checks["batch_sizes"] == [1, 7, 256] and checks["samples_one_at_a_time"] == 100


def test_verify_rejects_a_model_that_differs(artifact, trained_run):
    from pipeline.training.model_store import load_model

    model, _ = load_model(trained_run.out)
    generator = model.generator()
    z = np.random.default_rng(0).standard_normal((256, 4)).astype(np.float32)

    def shifted(x, outputs):
        return np.asarray(generator(x)) + 1e-3

    with pytest.raises(PipelineError, match="differs from Keras"):
        verify(artifact.out / "decoder.onnx", shifted, z, tolerance=1e-5)


def test_row_by_row_reference_checks_each_row_given_the_rows_above(trained_run):
    from pipeline.training.model_store import load_model

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


def broken_model(tmp_path, trained_run, kind):
    """A copy of the trained model directory, damaged one way."""
    import shutil

    train_dir = tmp_path / "train"
    shutil.copytree(trained_run.out / "model", train_dir / "model")
    weights, info_path = train_dir / "model" / "vae.keras", train_dir / "model" / "model.json"
    info = json.loads(info_path.read_text())
    if kind == "nan":  # a diverged model, recorded consistently
        from deploy.artifact import sha256_file
        from tests.helpers import poison_keras_file

        poison_keras_file(weights)
        info_path.write_text(json.dumps({**info, "model_sha256": sha256_file(weights)}))
    elif kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif kind == "bad json":
        info_path.write_text('{"architecture": ')
    elif kind == "no hash":
        info.pop("model_sha256")
        info_path.write_text(json.dumps(info))
    return train_dir


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("nan", "vae.keras: 1 weight arrays hold NaN or Inf"),
        ("truncated", "vae.keras: SHA-256 does not match model.json"),
        ("bad json", "model.json: unreadable JSON"),
        ("no hash", "records no model_sha256"),
    ],
)
@pytest.mark.parametrize("stage", ["evaluate", "export"])
def test_broken_model_files_are_one_line_and_nothing_is_written(
    tmp_path, capsys, small_dataset, trained_run, kind, message, stage
):
    from pipeline.cli import main
    from tests.helpers import single_error_line

    train_dir = broken_model(tmp_path, trained_run, kind)
    out = tmp_path / "out"
    argv = {
        "evaluate": ["evaluate", "--data", str(small_dataset), "--model", str(train_dir), "--out", str(out)],
        "export": ["export", "--model", str(train_dir), "--out", str(out)],
    }[stage]
    assert main(argv) == 2
    assert message in single_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_verify_refuses_non_finite_outputs(artifact):
    z = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)

    def nan_reference(chunk, outputs):
        return np.full_like(outputs[0], np.nan)

    # Before: max(0.0, nan) is 0.0, and a NaN model passed with "max difference 0.0e+00".
    with pytest.raises(PipelineError, match="NaN or Inf outputs; not exported"):
        verify(artifact.out / "decoder.onnx", nan_reference, z, tolerance=1e-5)


def test_a_file_dropped_into_the_artifact_stops_its_replacement(tmp_path, capsys, artifact, trained_run):
    import shutil

    from pipeline.cli import main
    from tests.helpers import single_error_line, tree_snapshot

    out = tmp_path / "artifact"
    shutil.copytree(artifact.out, out)
    (out / "notes.txt").write_text("mine")
    before = tree_snapshot(out)
    assert main(["export", "--model", str(trained_run.out), "--out", str(out)]) == 2
    assert "holds files the export stage did not write (notes.txt)" in single_error_line(capsys.readouterr().err)
    assert tree_snapshot(out) == before
