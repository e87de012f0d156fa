"""The model directory: Keras's own format, checked without Keras, and the upgrade of
the older `weights.npz` format."""

import json

import numpy as np

from deploy.artifact import sha256_file
from pipeline.cli import main
from pipeline.data.dataset import read_split
from pipeline.schema import MODEL_DIR
from pipeline.stages.evaluate import example_noise, score_batch
from pipeline.training.model_store import load_model
from tests.helpers import single_error_line


def test_plain_keras_opens_the_trained_model_and_gives_the_pipelines_elbo(small_dataset, trained_run):
    import keras

    import vae

    opened = keras.saving.load_model(trained_run.out / MODEL_DIR / "vae.keras")
    model, info = load_model(trained_run.out)
    assert isinstance(opened, vae.VAE) and opened.config.to_dict() == info["architecture"]
    images, labels = read_split(small_dataset, "test")
    ids = np.arange(32)
    scores = score_batch(model, {"id": ids, "image": images[:32], "label": labels[:32]}, iwae_k=2, seed=0)
    x = images[:32, ..., None].astype(np.float32) / 255.0
    eps = example_noise(ids, 0, (opened.config.latent_dim,))
    loss = np.asarray(opened.losses_per_example(x, eps=eps)[0])
    np.testing.assert_allclose(loss, scores["loss"], rtol=1e-6)
    assert np.isfinite(loss).all() and loss.mean() > 0


def legacy_model_dir(tmp_path, trained_run):
    """TRAIN_DIR/model/ as vae-pipeline 0.1 wrote it: weights.npz keyed by position."""
    model, info = load_model(trained_run.out)
    directory = tmp_path / "train" / MODEL_DIR
    directory.mkdir(parents=True)
    np.savez(directory / "weights.npz", **{f"model/{i}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)})
    info = {key: value for key, value in info.items() if key != "model_sha256"}
    info["weights_sha256"] = sha256_file(directory / "weights.npz")
    (directory / "model.json").write_text(json.dumps(info))
    return directory.parent, model


def test_an_older_model_directory_says_how_to_convert_it_and_the_upgrade_loads_the_same_model(
    tmp_path, capsys, small_dataset, trained_run
):
    train_dir, original = legacy_model_dir(tmp_path, trained_run)
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(small_dataset), "--model", str(train_dir), "--out", str(out)]) == 2
    line = single_error_line(capsys.readouterr().err)
    assert "weights.npz" in line and f"vae-pipeline upgrade-model {train_dir}" in line
    assert not out.exists()

    assert main(["upgrade-model", str(train_dir)]) == 0
    assert sorted(p.name for p in (train_dir / MODEL_DIR).iterdir()) == ["model.json", "vae.keras"]
    upgraded, info = load_model(train_dir)
    assert "weights_sha256" not in info and info["epochs"] == 3
    for before, after in zip(original.variables, upgraded.variables, strict=True):
        assert before.path == after.path
        np.testing.assert_array_equal(np.asarray(before.numpy()), np.asarray(after.numpy()))
    # Upgrading twice is a clear error, not a second conversion.
    assert main(["upgrade-model", str(train_dir)]) == 2
    assert "nothing to upgrade" in single_error_line(capsys.readouterr().err)
