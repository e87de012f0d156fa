"""The Node.js program (deploy/node/vae-node.mjs, onnxruntime-node) against Python's deploy,
on the test session's exported artifact."""

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from deploy import Generator
from deploy.png import write_grid

PROGRAM = Path(__file__).resolve().parents[2] / "deploy" / "node" / "vae-node.mjs"
NODE = shutil.which("node") or "node"


def vae_node(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NODE, str(PROGRAM), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def generator(artifact):
    return Generator(artifact.out, providers="cpu")


def test_node_decodes_fixed_latents_as_python_does(artifact, generator, tmp_path):
    latents = np.random.default_rng(11).standard_normal((9, generator.latent_dim)).astype(np.float32)
    (tmp_path / "latents.json").write_text(json.dumps({"latents": latents.tolist()}))
    done = vae_node(
        "--model",
        str(artifact.out),
        "--latents",
        str(tmp_path / "latents.json"),
        "--out",
        str(tmp_path / "images.json"),
    )
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "(9 images, latent size" in done.stdout
    images = np.array(json.loads((tmp_path / "images.json").read_text())["images"], np.float32)
    expected = generator.decode(latents)[..., 0]
    assert images.shape == expected.shape == (9, 28, 28)
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-5)


def test_node_png_grid_matches_vae_generates_grid(artifact, generator, tmp_path):
    from PIL import Image

    latents = np.random.default_rng(12).standard_normal((5, generator.latent_dim)).astype(np.float32)
    (tmp_path / "latents.json").write_text(json.dumps(latents.tolist()))
    done = vae_node(
        "--model", str(artifact.out), "--latents", str(tmp_path / "latents.json"), "--out", str(tmp_path / "grid.png")
    )
    assert done.returncode == 0, done.stderr
    buffer = io.BytesIO()
    write_grid(buffer, [generator.decode(latents)], 5)
    ours = np.asarray(Image.open(tmp_path / "grid.png"), np.int16)
    python = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), np.int16)
    assert ours.shape == python.shape == (60, 90)
    assert np.abs(ours - python).max() <= 1


def test_node_samples_with_a_seed_reproducibly(artifact, tmp_path):
    outputs = []
    for name in ("a.json", "b.json", "c.json"):
        seed = "1" if name == "c.json" else "0"
        done = vae_node("--model", str(artifact.out), "--n", "4", "--seed", seed, "--out", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
        outputs.append(np.array(json.loads((tmp_path / name).read_text())["images"]))
    assert outputs[0].shape == (4, 28, 28) and np.isfinite(outputs[0]).all()
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])


def test_a_tampered_model_is_refused_and_nothing_is_written(artifact, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(artifact.out, copy)
    data = bytearray((copy / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "decoder.onnx").write_bytes(bytes(data))
    done = vae_node("--model", str(copy), "--n", "2", "--out", str(tmp_path / "out.png"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vae-node: error: decoder.onnx does not match SHA256SUMS"), (
        done.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda dim: json.dumps([[0.0] * (dim + 1)]), "latent 0 must hold"),
        (lambda dim: json.dumps([[0.0] * dim, [None] * dim]), "latent 1 value 0 is not a finite number"),
        (lambda dim: json.dumps([]), "expected a list of 1 to"),
        (lambda dim: "[[0.0, NaN]]", "not JSON"),
        (lambda dim: json.dumps([[1e39] * dim]), "latent 0 value 0 is 1e+39, beyond float32's range"),
    ],
    ids=["wrong-size", "null", "empty", "nan", "beyond-float32"],
)
def test_bad_latents_are_one_line_and_write_nothing(artifact, generator, tmp_path, make, message):
    path = tmp_path / "latents.json"
    path.write_text(make(generator.latent_dim))
    done = vae_node("--model", str(artifact.out), "--latents", str(path), "--out", str(tmp_path / "out.json"))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert done.stderr.startswith("vae-node: error: ") and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "-1"], "vae-node: error: --n must be an integer in [1, 65536], got -1 (see vae-node --help)"),
        (
            ["--n", "2", "--latents", "x.json"],
            "vae-node: error: give exactly one of --latents and --n (see vae-node --help)",
        ),
        (["--n", "2", "--nn", "3"], "vae-node: error: Unknown option '--nn'"),
    ],
)
def test_usage_errors_are_one_line(artifact, tmp_path, args, message):
    done = vae_node("--model", str(artifact.out), *args, "--out", str(tmp_path / "grid.png"))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.strip().startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_a_file_it_did_not_write_is_never_replaced(artifact, tmp_path):
    """As vae-generate: --out may be new or a PNG (.png) or JSON of images (.json) it
    could have written; a file of any other kind, or a directory, is left alone."""
    notes = tmp_path / "notes.png"
    notes.write_text("my notes")
    other = tmp_path / "data.json"
    other.write_text('{"mine": [1, 2]}')
    (tmp_path / "dir.png").mkdir()
    for target, message in [
        (notes, "exists and is not a PNG file; refusing to replace it"),
        (other, "exists and is not a JSON file of images; refusing to replace it"),
        (tmp_path / "dir.png", "is a directory"),
    ]:
        done = vae_node("--model", str(artifact.out), "--n", "2", "--out", str(target))
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert notes.read_text() == "my notes" and other.read_text() == '{"mine": [1, 2]}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json", "dir.png", "notes.png"]
    grid = tmp_path / "grid.png"
    for n in ("2", "3"):  # its own earlier output is replaced
        assert vae_node("--model", str(artifact.out), "--n", n, "--out", str(grid)).returncode == 0
