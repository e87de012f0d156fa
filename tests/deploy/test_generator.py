import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from deploy import ArtifactError, Generator
from deploy.cli import main as generate_main
from tests.helpers import usage_error_line


@pytest.fixture(scope="module")
def generator(artifact):
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
    from pipeline.training.model_store import load_model

    model, _ = load_model(trained_run.out)
    z = np.random.default_rng(3).standard_normal((32, 4)).astype(np.float32)
    np.testing.assert_allclose(generator.decode(z), np.asarray(model.generator()(z)), atol=1e-5)


def test_chunked_batches_equal_one_run(artifact):
    z = np.random.default_rng(4).standard_normal((301, 4)).astype(np.float32)
    images = np.random.default_rng(5).uniform(size=(150, 28, 28, 1)).astype(np.float32)
    with (
        Generator(artifact.out, providers="cpu", parallel=1) as single,
        Generator(artifact.out, providers="cpu", parallel=3) as chunked,
    ):
        assert chunked.parallel == 3 and single.parallel == 1
        np.testing.assert_allclose(chunked.decode(z), single.decode(z), atol=1e-6)
        for got, expected in zip(chunked.encode(images), single.encode(images), strict=True):
            assert got.shape == (150, 4)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="parallel"):
        Generator(artifact.out, providers="cpu", parallel=0)


def test_large_batches_run_in_bounded_pieces_written_in_place(artifact):
    """max_batch splits a batch into pieces of at most that many rows; onnxruntime writes
    each piece's outputs straight into its rows of the result (I/O binding)."""
    import onnxruntime as ort

    z = np.random.default_rng(6).standard_normal((130, 4)).astype(np.float32)
    images = np.random.default_rng(7).uniform(size=(130, 28, 28, 1)).astype(np.float32)
    with Generator(artifact.out, providers="cpu", parallel=1, max_batch=50) as pieces:
        assert pieces._spans(130) == [(0, 43), (43, 87), (87, 130)]
        decoder = ort.InferenceSession(str(artifact.out / "decoder.onnx"), providers=["CPUExecutionProvider"])
        encoder = ort.InferenceSession(str(artifact.out / "encoder.onnx"), providers=["CPUExecutionProvider"])
        spans = [slice(a, b) for a, b in pieces._spans(130)]
        expected = np.concatenate([decoder.run(None, {"z": z[s]})[0] for s in spans])
        assert np.array_equal(pieces.decode(z), expected)
        z_mean, z_log_var = pieces.encode(images)
        for got, column in ((z_mean, 0), (z_log_var, 1)):
            assert np.array_equal(got, np.concatenate([encoder.run(None, {"image": images[s]})[column] for s in spans]))
    with Generator(artifact.out, providers="cpu", parallel=2, max_batch=20) as both:
        assert max(b - a for a, b in both._spans(130)) <= 20
        np.testing.assert_allclose(both.decode(z), expected, atol=1e-6)
    with pytest.raises(ValueError, match="max_batch"):
        Generator(artifact.out, providers="cpu", max_batch=0)


def test_cuda_is_exact_unless_tf32_is_allowed_and_cuda_means_cuda_only():
    import onnxruntime as ort

    from deploy.generator import choose_providers, provider_options

    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    assert provider_options([cuda, cpu]) == [{"use_tf32": "0"}, {}]
    assert provider_options([cuda], allow_tf32=True, cuda_options={"device_id": 1}) == [
        {"use_tf32": "1", "device_id": "1"}
    ]
    if cuda in ort.get_available_providers():
        assert choose_providers("cuda") == [cuda]  # no CPU: a refused node is an error
    with pytest.raises(ValueError, match="providers must be"):
        choose_providers("gpu")


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


def test_tampered_file_is_refused(tmp_path, artifact):
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


def test_auto_providers_fall_back_to_cpu(artifact):
    import onnxruntime as ort

    generator = Generator(artifact.out)
    assert generator.providers[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert generator.providers == ["CPUExecutionProvider"]
        with pytest.raises(ValueError, match="CUDA requested"):
            Generator(artifact.out, providers="cuda")


def test_deploy_runs_without_tensorflow(artifact):
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


def test_vae_generate_writes_a_png(tmp_path, artifact, capsys):
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


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--model", "m", "--out", "x.png", "--n", "0"],
            "vae-generate: error: argument --n: must be a positive integer",
        ),
        (
            ["--model", "m", "--out", "x.png", "--n", "10000000000"],
            "vae-generate: error: argument --n: must be at most 1000000 (one PNG grid), got 10000000000",
        ),
        (["--out", "x.png"], "vae-generate: error: the following arguments are required: --model"),
        (["serve", "--model", "m", "--port", "0"], "(see vae-generate serve --help)"),
        (
            ["serve", "--model", "m", "--body-timeout-s", "30"],
            "vae-generate: error: --body-timeout-s: the body timeout must be in (0, 30) s, got 30 (see",
        ),
    ],
)
def test_vae_generate_usage_errors_are_one_line_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert message in usage_error_line(generate_main, argv, capsys)
    assert list(tmp_path.iterdir()) == []


def test_one_image_and_wrong_argument_types_are_clear_value_errors(generator):
    with pytest.raises(ValueError, match=r"got one image of shape \(28, 28, 1\): pass images\[None\]"):
        generator.encode(np.zeros((28, 28, 1), np.float32))
    with pytest.raises(ValueError, match="n must be a positive integer, got True"):
        generator.sample(True)
    with pytest.raises(ValueError, match="temperature must be a positive finite number, got '1'"):
        generator.sample(2, temperature="1")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        generator.sample_batches(2, batch_size=0)  # at the call, before any batch is asked for


def test_batches_are_the_same_images_as_one_sample(generator):
    streamed = np.concatenate(list(generator.sample_batches(300, seed=7, temperature=0.8, batch_size=128)))
    np.testing.assert_array_equal(streamed, generator.sample(300, seed=7, temperature=0.8))
    assert [len(b) for b in generator.sample_batches(300, seed=7, batch_size=128)] == [128, 128, 44]


@pytest.fixture
def nan_artifact(tmp_path, artifact):
    """The artifact with one decoder weight set to NaN, its SHA256SUMS rewritten to match."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from pipeline.stages.export import write_checksums

    copy = tmp_path / "nan-artifact"
    shutil.copytree(artifact.out, copy)
    model = onnx.load(str(copy / "decoder.onnx"))
    weight = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2)
    broken = numpy_helper.to_array(weight).copy()
    broken[:] = np.nan
    weight.CopyFrom(numpy_helper.from_array(broken, weight.name))
    onnx.save(model, str(copy / "decoder.onnx"))
    (copy / "SHA256SUMS").unlink()
    write_checksums(copy)
    return copy


def test_a_model_that_gives_nan_is_refused_at_load(nan_artifact):
    with pytest.raises(ArtifactError, match="gives NaN or Inf for finite inputs"):
        Generator(nan_artifact, providers="cpu")


def test_vae_generate_with_a_nan_model_is_one_line_and_writes_nothing(tmp_path, capsys, nan_artifact):
    out = tmp_path / "grid.png"
    assert generate_main(["--model", str(nan_artifact), "--n", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vae-generate: error: ") and "NaN or Inf" in err[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["nan-artifact"]


def test_vae_generate_grid_holds_the_sampled_images(tmp_path, artifact, generator):
    import matplotlib.image

    out = tmp_path / "grid.png"
    assert generate_main(["--model", str(artifact.out), "--n", "7", "--seed", "3", "--out", str(out)]) == 0
    pixels = np.round(matplotlib.image.imread(str(out)) * 255).astype(np.uint8)
    images = generator.sample(7, seed=3)
    assert pixels.shape == (3 * 30, 3 * 30)
    for index, image in enumerate(images):
        row, column = divmod(index, 3)
        tile = pixels[row * 30 + 1 : row * 30 + 29, column * 30 + 1 : column * 30 + 29]
        np.testing.assert_array_equal(tile, (255 - np.round(image[..., 0] * 255)).astype(np.uint8))
    assert (pixels[2 * 30 :, 30:] == 255).all()  # the two unused cells stay white


def test_vae_generate_refuses_a_directory_or_a_non_png_and_leaves_no_temporary(tmp_path, capsys, artifact):
    directory = tmp_path / "outdir"
    directory.mkdir()
    assert generate_main(["--model", str(artifact.out), "--n", "4", "--out", str(directory)]) == 2
    assert "is a directory" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    assert generate_main(["--model", str(artifact.out), "--n", "4", "--out", str(notes)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists and is not a PNG file" in err[0]
    assert notes.read_text() == "keep me" and list(directory.iterdir()) == []
    png = tmp_path / "grid.png"
    for n in ("4", "9"):  # an earlier PNG is replaced
        assert generate_main(["--model", str(artifact.out), "--n", n, "--out", str(png)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "notes.txt", "outdir"]


def test_sigterm_mid_write_leaves_no_temporary_file(artifact, tmp_path):
    """`timeout`, kill and supervisors send SIGTERM: it ends like Ctrl-C, removing its
    half-written `.OUT.tmp-PID` (once left behind, up to 635 MB)."""
    out = tmp_path / "grid.png"
    command = [sys.executable, "-m", "deploy.cli", "--model", str(artifact.out), "--n", "1000000", "--out", str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".grid.png.tmp-*")):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130
    assert process.stderr.read().strip().splitlines()[-1] == "vae-generate: interrupted"
    assert list(tmp_path.iterdir()) == []


def peak_rss_mb(artifact_dir, n, out):
    """Peak resident memory of a fresh `vae-generate --n N` process, in MB."""
    code = textwrap.dedent(
        f"""
        import resource, sys
        from deploy.cli import main
        code = main(["--model", {str(artifact_dir)!r}, "--n", "{n}", "--out", {str(out)!r}])
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, code)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    rss, code = result.stdout.split()[-2:]
    assert code == "0", result.stderr
    return float(rss)


def test_vae_generate_memory_does_not_grow_with_n(tmp_path, artifact):
    # Before streaming, memory grew by about 0.2 MB an image: 4 GB more at 20,000.
    small = peak_rss_mb(artifact.out, 500, tmp_path / "small.png")
    large = peak_rss_mb(artifact.out, 20_000, tmp_path / "large.png")
    assert large - small < 64, (small, large)


def test_single_images_go_through_the_graph_thread_from_any_caller(artifact, monkeypatch):
    """The single-image CUDA-graph plumbing (its own thread, bound buffers, z copied in and
    the image out) run on the CPU, since CI has no GPU: the provider and memory names it
    uses point at the CPU's."""
    import threading

    import deploy.cuda_graph as module

    monkeypatch.setattr(module, "GRAPH_PROVIDER", "CPUExecutionProvider")
    monkeypatch.setattr(module, "CUDA_DEVICE", "cpu")
    z = np.random.default_rng(9).standard_normal((24, 4)).astype(np.float32)
    graph_threads = lambda: [t for t in threading.enumerate() if t.name.startswith("vae-cuda-graph")]  # noqa: E731
    with Generator(artifact.out, providers="cpu", parallel=1) as generator:
        assert len(graph_threads()) == 1
        whole = generator.decode(z)  # more than one row: the plain session
        singles = np.concatenate([generator.decode(z[i : i + 1]) for i in range(len(z))])
        with ThreadPoolExecutor(4) as pool:
            threaded = np.concatenate(list(pool.map(lambda i: generator.decode(z[i : i + 1]), range(len(z)))))
        np.testing.assert_allclose(singles, whole, atol=1e-6)
        np.testing.assert_array_equal(threaded, singles)
    assert graph_threads() == []  # closed with the generator; decoding still works
    np.testing.assert_allclose(generator.decode(z[:1]), whole[:1], atol=1e-6)


def test_cuda_libraries_are_preloaded_once_and_what_is_missing_is_one_warning(monkeypatch, capsys):
    """onnxruntime-gpu's CUDA libraries from pip live off the loader's path: `preload_dlls`
    loads them. What it prints about missing ones becomes a warning, not stdout noise."""
    import onnxruntime as ort

    from deploy.generator import load_cuda_libraries

    calls = []

    def preload():
        calls.append(1)
        print("Failed to load libcudart.so.13: not found")
        print("Failed to load libcublas.so.13: not found")
        print("Please follow https://onnxruntime.ai/docs/install/#cuda-and-cudnn to install CUDA.")

    monkeypatch.setattr(ort, "preload_dlls", preload, raising=False)
    load_cuda_libraries.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"libcudart.so.13: not found \(2 libraries missing\)"):
            load_cuda_libraries()
        load_cuda_libraries()
    finally:
        load_cuda_libraries.cache_clear()
    assert calls == [1] and capsys.readouterr().out == ""


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _has_cuda(), reason="needs onnxruntime-gpu and a CUDA device")
def test_both_graphs_run_wholly_on_cuda_and_agree_with_the_cpu(artifact):
    """Run only where CUDA is: sessions with the CPU fallback disabled load both graphs,
    and single images, replayed as a captured CUDA graph, are the plain session's."""
    from deploy.generator import provider_options
    from pipeline.onnx.row_fill import provider_agreement

    z = np.random.default_rng(8).standard_normal((5000, 4)).astype(np.float32)
    with (
        Generator(artifact.out, providers="cuda") as gpu,
        Generator(artifact.out, providers="cuda", cuda_graph=False) as plain,
        Generator(artifact.out, providers="cpu") as cpu,
    ):
        assert gpu.providers[0] == "CUDAExecutionProvider"  # onnxruntime always lists the CPU last
        assert gpu.session_options.get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
        assert gpu.decode(z).shape == (5000, 28, 28, 1)  # two pieces of at most 4,096 rows
        singles = np.concatenate([gpu.decode(z[i : i + 1]) for i in range(20)])  # the CUDA graph
        np.testing.assert_allclose(singles, plain.decode(z[:20]), atol=1e-5)
        np.testing.assert_allclose(singles, cpu.decode(z[:20]), atol=2e-3)
        assert np.abs(singles[1:] - singles[:-1]).max() > 0.1  # each call saw its own z
        with ThreadPoolExecutor(4) as pool:  # callers on any thread: each gets its own image
            threaded = np.concatenate(list(pool.map(lambda i: gpu.decode(z[i : i + 1]), range(20))))
        np.testing.assert_allclose(threaded, singles, atol=1e-5)  # cuDNN's sums are not bit-reproducible
        images = cpu.decode(z[:64])
        for got, expected in zip(gpu.encode(images), cpu.encode(images), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    cuda = ["CUDAExecutionProvider"]
    agreement = provider_agreement(artifact.out / "decoder.onnx", cuda, provider_options(cuda))
    assert agreement["rows given the same rows above, max"] < 1e-5, agreement  # as the export check
    assert agreement["whole images, max"] < 2e-3, agreement  # TF32 off; docs/serving.md
