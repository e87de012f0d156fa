"""`Generator`: one onnxruntime session per model, made once and reused."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import numbers
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from deploy import cuda_graph as graphs
from deploy.artifact import DECODER_FILE, ENCODER_FILE, IMAGE_SHAPE, ArtifactError, verify_checksums

MIN_CHUNK_ROWS = 32  # smaller chunks cost more in thread hand-offs than they gain
STREAM_BATCH = 1024  # images decoded per call by `sample_batches`: memory stays flat in n
CUDA_MAX_BATCH = 4096  # rows per onnxruntime call on CUDA: device memory stays bounded
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
NO_CPU_FALLBACK = "session.disable_cpu_ep_fallback"


def choose_providers(providers: str | Sequence[str] = "auto") -> list[str]:
    """'auto': CUDA when this onnxruntime offers it, then CPU; 'cpu'; 'cuda' (CUDA only:
    a node CUDA cannot run is an error, not a silent CPU fallback); or an explicit list."""
    available = ort.get_available_providers()
    if providers == "auto":
        chosen = [p for p in (CUDA,) if p in available]
        return [*chosen, CPU]
    if providers == "cpu":
        return [CPU]
    if providers == "cuda":
        if CUDA not in available:
            raise ValueError(f"CUDA requested but this onnxruntime offers only {available}")
        return [CUDA]
    if isinstance(providers, str):
        raise ValueError(f"providers must be 'auto', 'cpu', 'cuda' or a list of providers, got {providers!r}")
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"providers {missing} not available; this onnxruntime offers {available}")
    return list(providers)


def provider_options(providers: list[str], allow_tf32: bool = False, cuda_options: dict | None = None) -> list[dict]:
    """onnxruntime options for each provider. CUDA computes in full float32 unless
    `allow_tf32` (TF32 matmuls and convolutions: faster on Ampere and later, but each
    product keeps only 10 mantissa bits; measured on an H100 with the default model,
    whole generated images then differed from the CPU's by up to 0.39 against 2.1e-3
    without; see docs/benchmarks.md)."""
    cuda = {"use_tf32": "1" if allow_tf32 else "0", **{k: str(v) for k, v in (cuda_options or {}).items()}}
    return [cuda if p == CUDA else {} for p in providers]


@functools.cache  # once a process: what it loads stays loaded
def load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries onnxruntime-gpu's CUDA provider links against.

    Installed as pip packages (`pip install "onnxruntime-gpu[cuda,cudnn]"`), they sit in
    site-packages, off the dynamic loader's path, and the provider fails to start without
    `onnxruntime.preload_dlls()`; libraries already on the path are found there too.
    What it prints about libraries it cannot load becomes one warning."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # onnxruntime before 1.21: the libraries must be on the loader's path
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            preload()
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own; CUDA then fails with its own message
        warnings.warn(f"onnxruntime.preload_dlls failed: {exc}", stacklevel=3)
        return
    failures = [line.strip() for line in printed.getvalue().splitlines() if line.startswith("Failed to load")]
    if failures:
        warnings.warn(f"onnxruntime.preload_dlls: {failures[0]} ({len(failures)} libraries missing)", stacklevel=3)


class Generator:
    """Decode, sample, interpolate and encode with an exported VAE artifact.

    Args:
        artifact_dir: the export stage's output directory. Every file listed in its
            SHA256SUMS is checked before loading; a mismatch raises ArtifactError.
        providers: "auto" (CUDA if available, else CPU, nodes CUDA refuses on the
            CPU), "cpu", "cuda" (every node on CUDA, else ArtifactError at load), or a
            list of onnxruntime execution providers. `self.providers` says what
            onnxruntime actually loaded.
        parallel: large batches are split into chunks run by this many threads at
            once (onnxruntime sessions are thread-safe). None: one per CPU core on the
            CPU provider, 1 on CUDA. onnxruntime's CPU convolutions parallelise poorly
            within one small image batch, so chunks on separate cores give ~2x the
            throughput on 2 cores (see benchmarks/inference.py).
        intra_op_threads / inter_op_threads: onnxruntime thread pools (0: its
            default, which is 1 intra-op thread per session when `parallel` > 1).
        allow_tf32: let CUDA use TF32 (see `provider_options`); off by default, so
            GPU results match the CPU's to float32 rounding.
        max_batch: most rows per onnxruntime call; larger batches run in pieces.
            None: 4,096 on CUDA (bounded device memory, and the throughput of a
            large batch does not fall), unbounded on the CPU.
        cuda_options: further CUDA provider options, e.g. {"device_id": 1}.
        cuda_graph: on CUDA, decode single images by replaying one captured CUDA graph
            (`SingleImageGraph`) instead of launching the decoder's kernels one by one:
            about 3x less time per call on an H100. Used when the decoder runs
            wholly on CUDA; False: always the plain session.
    """

    def __init__(
        self,
        artifact_dir: str | os.PathLike,
        providers: str | Sequence[str] = "auto",
        parallel: int | None = None,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        allow_tf32: bool = False,
        max_batch: int | None = None,
        cuda_options: dict | None = None,
        cuda_graph: bool = True,
    ):
        self.artifact_dir = Path(artifact_dir)
        sums = verify_checksums(self.artifact_dir)
        requested = choose_providers(providers)
        if CUDA in requested:
            load_cuda_libraries()
        on_cpu = requested[0] == CPU
        if parallel is None:
            parallel = (os.cpu_count() or 1) if on_cpu else 1
        _check_count(parallel, "parallel")
        if max_batch is not None:
            _check_count(max_batch, "max_batch")
        self.parallel = int(parallel)
        self.max_batch = max_batch or (None if on_cpu else CUDA_MAX_BATCH)
        self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="vae-generate") if self.parallel > 1 else None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads or (1 if self.parallel > 1 else 0)
        options.inter_op_num_threads = inter_op_threads
        if requested == [CUDA]:  # "cuda" means every node on CUDA: fail rather than fall back
            options.add_session_config_entry(NO_CPU_FALLBACK, "1")
        self.session_options = options
        per_provider = provider_options(requested, allow_tf32, cuda_options)
        self._decoder = _session(self.artifact_dir / DECODER_FILE, options, requested, per_provider)
        self._encoder = None
        if ENCODER_FILE in sums:
            self._encoder = _session(self.artifact_dir / ENCODER_FILE, options, requested, per_provider)
        self.providers = self._decoder.get_providers()  # what onnxruntime really runs on
        if requested[0] == CUDA and self.providers[0] != CUDA:
            warnings.warn(f"onnxruntime could not start CUDA; running on {self.providers}", stacklevel=2)
        self._single = None
        if cuda_graph and self.providers[0] == graphs.GRAPH_PROVIDER:
            self._single = graphs.SingleImageGraph.create(
                self.artifact_dir / DECODER_FILE,
                options,
                per_provider[requested.index(graphs.GRAPH_PROVIDER)],
                self._decoder,
            )
        meta = self._decoder.get_modelmeta().custom_metadata_map
        self.latent_dim = int(self._decoder.get_inputs()[0].shape[1])
        self.class_names = json.loads(meta["class_names"]) if "class_names" in meta else None
        self.metadata = dict(meta)
        # A model with broken (NaN) weights fails here, not in the caller's first batch.
        self.decode(np.zeros((1, self.latent_dim), np.float32))

    def close(self) -> None:
        """Stop the chunk threads and the CUDA graph's thread (the sessions are freed
        with the object; decoding still works, without them)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._single is not None:
            self._single.close()
            self._single = None

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, session, outputs: list[str], name: str, batch: np.ndarray) -> list[np.ndarray]:
        """session.run over `batch`. A large batch is split into spans run on the thread
        pool (CPU) or one after another (CUDA, at most `max_batch` rows each, so device
        memory stays bounded); each span's outputs are written by onnxruntime straight
        into its rows of the result (I/O binding), so nothing is concatenated."""
        if len(batch) < 2 * MIN_CHUNK_ROWS and (self.max_batch is None or len(batch) <= self.max_batch):
            return session.run(outputs, {name: batch})  # one span: the common small call, planned at once
        spans = self._spans(len(batch))
        if len(spans) == 1:
            return session.run(outputs, {name: batch})
        shapes = {o.name: o.shape[1:] for o in session.get_outputs()}
        results = [np.empty((len(batch), *shapes[o]), np.float32) for o in outputs]

        def run_span(span: tuple[int, int]) -> None:
            start, stop = span
            binding = session.io_binding()
            binding.bind_cpu_input(name, batch[start:stop])
            for output, result in zip(outputs, results, strict=True):
                rows = result[start:stop]
                binding.bind_output(output, "cpu", 0, np.float32, rows.shape, rows.ctypes.data)
            session.run_with_iobinding(binding)

        if self._pool is None:
            for span in spans:
                run_span(span)
        else:
            list(self._pool.map(run_span, spans))
        return results

    def _spans(self, rows: int) -> list[tuple[int, int]]:
        """[start, stop) row ranges: 2 per thread when the batch is large enough, and none
        longer than `max_batch`."""
        count = max(1, min(2 * self.parallel, rows // MIN_CHUNK_ROWS)) if self._pool is not None else 1
        if self.max_batch is not None:
            count = max(count, -(-rows // self.max_batch))
        bounds = [(2 * rows * i + count) // (2 * count) for i in range(count + 1)]  # rounded i * rows / count
        return list(zip(bounds[:-1], bounds[1:], strict=True))

    def decode(self, z) -> np.ndarray:
        """Latents (N, latent_dim) -> images (N, 28, 28, 1) float32 in [0, 1].

        Raises ArtifactError if the model gives NaN or Inf for finite latents (broken
        weights): a NaN image is never returned.
        """
        z = _check_batch(z, (self.latent_dim,), "z")
        single = self._single
        if len(z) == 1 and single is not None:
            return _finite([single(z)], self.artifact_dir, DECODER_FILE)[0]
        return _finite(self._run(self._decoder, ["image"], "z", z), self.artifact_dir, DECODER_FILE)[0]

    def sample(self, n: int, seed: int | None = None, temperature: float = 1.0) -> np.ndarray:
        """`n` images decoded from z ~ N(0, temperature^2 I)."""
        _check_count(n, "n")
        _check_temperature(temperature)
        rng = np.random.default_rng(seed)
        z = (rng.standard_normal((int(n), self.latent_dim)) * temperature).astype(np.float32)
        return self.decode(z)

    def sample_batches(
        self, n: int, seed: int | None = None, temperature: float = 1.0, batch_size: int = STREAM_BATCH
    ) -> Iterator[np.ndarray]:
        """The images of `sample(n, seed, temperature)` in batches of up to
        `batch_size`: the same images, drawn from the same random stream, with memory
        that does not grow with `n`."""
        _check_count(n, "n")  # checked here, at the call, not at the first batch
        _check_count(batch_size, "batch_size")
        _check_temperature(temperature)
        return self._sample_stream(int(n), seed, temperature, int(batch_size))

    def _sample_stream(self, n: int, seed, temperature, batch_size: int) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        for start in range(0, n, batch_size):
            rows = min(batch_size, n - start)
            z = (rng.standard_normal((rows, self.latent_dim)) * temperature).astype(np.float32)
            yield self.decode(z)

    def interpolate(self, a, b, steps: int) -> np.ndarray:
        """Images along the straight line from latent `a` to latent `b` (both (latent_dim,)), ends included."""
        if not isinstance(steps, (int, np.integer)) or steps < 2:
            raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
        a = _check_batch(np.asarray(a)[None] if np.ndim(a) == 1 else a, (self.latent_dim,), "a")
        b = _check_batch(np.asarray(b)[None] if np.ndim(b) == 1 else b, (self.latent_dim,), "b")
        if len(a) != 1 or len(b) != 1:
            raise ValueError("a and b must each be one latent vector")
        weights = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]  # (steps, 1)
        return self.decode((1.0 - weights) * a + weights * b)

    def encode(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Images (N, 28, 28, 1) or (N, 28, 28), float32 in [0, 1] -> (z_mean, z_log_var)."""
        if self._encoder is None:
            raise ValueError(f"{self.artifact_dir} has no {ENCODER_FILE}")
        images = np.asarray(images)
        if images.shape in (IMAGE_SHAPE, IMAGE_SHAPE[:2]):
            raise ValueError(
                f"images must be a batch of shape (N, {', '.join(map(str, IMAGE_SHAPE))}) or "
                f"(N, {', '.join(map(str, IMAGE_SHAPE[:2]))}), got one image of shape {images.shape}: pass images[None]"
            )
        if images.ndim == 3:
            images = images[..., None]
        images = _check_batch(images, IMAGE_SHAPE, "images")
        if images.min() < 0.0 or images.max() > 1.0:
            raise ValueError("images must be scaled to [0, 1] (divide uint8 pixels by 255)")
        outputs = self._run(self._encoder, ["z_mean", "z_log_var"], "image", images)
        z_mean, z_log_var = _finite(outputs, self.artifact_dir, ENCODER_FILE)
        return z_mean, z_log_var


def _session(path: Path, options, providers: list[str], options_per_provider: list[dict]):
    try:
        return ort.InferenceSession(str(path), options, providers=providers, provider_options=options_per_provider)
    except Exception as exc:  # onnxruntime raises its own exception types
        if providers == [CUDA]:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(
                f"{path}: cannot run wholly on CUDA ({first}); export it again with this version, "
                "or use providers='auto' to let onnxruntime run the rest on the CPU"
            ) from exc
        raise


def _check_count(value, name: str) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_temperature(temperature) -> None:
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def _finite(outputs: list[np.ndarray], artifact_dir: Path, name: str) -> list[np.ndarray]:
    """`outputs`, once every value is finite; ArtifactError otherwise."""
    for output in outputs:
        if not np.isfinite(output).all():
            raise ArtifactError(f"{artifact_dir / name}: the model gives NaN or Inf for finite inputs (broken weights)")
    return outputs


def _check_batch(array, item_shape: tuple[int, ...], name: str) -> np.ndarray:
    """A non-empty, finite float32 batch of shape (N, *item_shape); ValueError otherwise."""
    if (
        type(array) is np.ndarray
        and array.dtype == np.float32
        and array.shape[1:] == item_shape
        and array.ndim == len(item_shape) + 1
        and array.shape[0]
        and array.flags.c_contiguous
    ):  # already what onnxruntime takes (the usual call): only the values to check
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contains NaN or Inf")
        return array
    array = np.asarray(array)
    if array.ndim != len(item_shape) + 1:
        raise ValueError(f"{name} must have shape (N, {', '.join(map(str, item_shape))}), got {array.shape}")
    if array.shape[1:] != item_shape:
        raise ValueError(f"{name} must have shape (N, {', '.join(map(str, item_shape))}), got {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return np.ascontiguousarray(array)
