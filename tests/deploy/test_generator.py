import subprocess
import sys
import textwrap

import numpy as np
import pytest

from deploy import ArtifactError, Generator
from deploy.cli import main as generate_main
from tests.pipeline.test_export import artifact  # noqa: F401  (session fixture)


@pytest.fixture(scope="module")
def generator(artifact):  # noqa: F811
    return Generator(artifact.out, providers="cpu")


def test_decode_sample_interpolate_encode_shapes(generator):
    assert generator.latent_dim == 4
    images = generator.sample(5, seed=0)
    assert images.shape == (5, 28, 28, 1) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(images, generator.sample(5, seed=0))
    assert not np.array_equal(images, generator.sample(5, seed=1))
    path = generator.interpolate(np.zeros(4, np.float32), np.ones(4, np.float32), steps=6)
    assert path.shape == (6, 28, 28, 1)
    np.testing.assert_allclose(path[0], generator.decode(np.zeros((1, 4), np.float32))[0], atol=1e-6)
    z_mean, z_log_var = generator.encode(images)
    assert z_mean.shape == (5, 4) and z_log_var.shape == (5, 4)


def test_decode_matches_keras(generator, trained_run):
    from pipeline.model_store import load_model
    model, _ = load_model(trained_run.out)
    z = np.random.default_rng(3).standard_normal((32, 4)).astype(np.float32)
    np.testing.assert_allclose(generator.decode(z), np.asarray(model.generator()(z)), atol=1e-5)


def test_chunked_batches_equal_one_run(artifact):  # noqa: F811
    z = np.random.default_rng(4).standard_normal((301, 4)).astype(np.float32)
    images = np.random.default_rng(5).uniform(size=(150, 28, 28, 1)).astype(np.float32)
    with Generator(artifact.out, providers="cpu", parallel=1) as single, Generator(
        artifact.out, providers="cpu", parallel=3
    ) as chunked:
        assert chunked.parallel == 3 and single.parallel == 1
        np.testing.assert_allclose(chunked.decode(z), single.decode(z), atol=1e-6)
        for got, expected in zip(chunked.encode(images), single.encode(images), strict=True):
            assert got.shape == (150, 4)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="parallel"):
        Generator(artifact.out, providers="cpu", parallel=0)


def test_temperature_zero_like_small_values_shrink_toward_the_mean_image(generator):
    cold = generator.sample(64, seed=0, temperature=1e-3)
    assert np.abs(cold - cold[0]).max() < 1e-2


@pytest.mark.parametrize(
    ("z", "message"),
    [
        (np.zeros((3,), np.float32), "must have shape"),
        (np.zeros((3, 5), np.float32), "must have shape"),
        (np.zeros((0, 4), np.float32), "empty batch"),
        (np.zeros((2, 4), np.int64), "floating point"),
        (np.array([[0, 0, np.nan, 0]], np.float32), "NaN or Inf"),
        (np.array([[0, np.inf, 0, 0]], np.float32), "NaN or Inf"),
    ],
)
def test_bad_latents_are_value_errors(generator, z, message):
    with pytest.raises(ValueError, match=message):
        generator.decode(z)


def test_bad_images_and_arguments_are_value_errors(generator):
    with pytest.raises(ValueError, match="scaled to"):
        generator.encode(np.full((1, 28, 28, 1), 255.0, np.float32))
    with pytest.raises(ValueError, match="must have shape"):
        generator.encode(np.zeros((1, 32, 32, 1), np.float32))
    with pytest.raises(ValueError, match="n must be"):
        generator.sample(0)
    with pytest.raises(ValueError, match="temperature"):
        generator.sample(2, temperature=float("nan"))
    with pytest.raises(ValueError, match="steps"):
        generator.interpolate(np.zeros(4), np.ones(4), steps=1)


def test_tampered_file_is_refused(tmp_path, artifact):  # noqa: F811
    import shutil

    copy = tmp_path / "artifact"
    shutil.copytree(artifact.out, copy)
    data = bytearray((copy / "decoder.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match SHA256SUMS"):
        Generator(copy)
    (copy / "SHA256SUMS").unlink()
    with pytest.raises(ArtifactError, match="no SHA256SUMS"):
        Generator(copy)


def test_auto_providers_fall_back_to_cpu(artifact):  # noqa: F811
    import onnxruntime as ort

    generator = Generator(artifact.out)
    assert generator.providers[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert generator.providers == ["CPUExecutionProvider"]
        with pytest.raises(ValueError, match="CUDA requested"):
            Generator(artifact.out, providers="cuda")


def test_deploy_runs_without_tensorflow(artifact):  # noqa: F811
    """A fresh interpreter where importing TensorFlow, Keras or Ray fails outright."""
    code = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorflow", "keras", "ray", "tf2onnx", "vae", "pipeline"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from deploy import Generator
        images = Generator({str(artifact.out)!r}, providers="cpu").sample(3, seed=1)
        assert images.shape == (3, 28, 28, 1)
        print("ok", sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "ray")))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok []"


def test_vae_generate_writes_a_png(tmp_path, artifact, capsys):  # noqa: F811
    out = tmp_path / "grid.png"
    assert generate_main(["--model", str(artifact.out), "--n", "10", "--seed", "0", "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(str(out))
    assert pixels.shape == (3 * 30, 4 * 30)  # 10 images in rows of ceil(sqrt(10)) = 4


def test_vae_generate_bad_artifact_is_one_line(tmp_path, capsys):
    assert generate_main(["--model", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no SHA256SUMS" in err[0]
