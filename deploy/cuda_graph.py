"""Decoding single images on CUDA by replaying one captured CUDA graph (used by Generator)."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

# The provider a graph runs on, and onnxruntime's name for its memory (tests point both
# at the CPU's, to run the plumbing without a GPU).
GRAPH_PROVIDER, CUDA_DEVICE = "CUDAExecutionProvider", "cuda"


class SingleImageGraph:
    """Decoding one latent on CUDA as one captured CUDA graph.

    A batch-1 call of the plain CUDA session costs about 0.8 ms on an H100, almost all
    of it launching the decoder's kernels one after another; onnxruntime can capture
    them once as a CUDA graph and replay it (its `enable_cuda_graph` option), which
    needs the input and output at fixed device addresses. So this holds a second
    session with the option on, a device buffer for z and one for the image, and
    copies z in and the image out on each call. onnxruntime does not support CUDA-graph
    runs of one session from several threads, so every run happens on this object's own
    thread, one at a time, whichever thread calls (a hand-off of about 60 us).
    """

    def __init__(self, path: Path, options, cuda_options: dict, latent_dim: int, image_shape: tuple[int, ...]):
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vae-cuda-graph")
        try:
            self._thread.submit(self._start, path, options, cuda_options, latent_dim, image_shape).result()
        except BaseException:
            self._thread.shutdown()
            raise

    def _start(self, path: Path, options, cuda_options: dict, latent_dim: int, image_shape) -> None:
        self._session = ort.InferenceSession(
            str(path),
            options,
            providers=[GRAPH_PROVIDER],
            provider_options=[{**cuda_options, "enable_cuda_graph": "1"}],
        )
        device = int(cuda_options.get("device_id", 0))
        self._z = ort.OrtValue.ortvalue_from_shape_and_type((1, latent_dim), np.float32, CUDA_DEVICE, device)
        self._image = ort.OrtValue.ortvalue_from_shape_and_type((1, *image_shape), np.float32, CUDA_DEVICE, device)
        self._binding = self._session.io_binding()
        self._binding.bind_ortvalue_input(self._session.get_inputs()[0].name, self._z)
        self._binding.bind_ortvalue_output(self._session.get_outputs()[0].name, self._image)
        for _ in range(2):  # onnxruntime runs once plainly, then captures and replays
            self._run(np.zeros((1, latent_dim), np.float32))

    @classmethod
    def create(cls, path: Path, options, cuda_options: dict, plain) -> SingleImageGraph | None:
        """One for the decoder at `path` (whose plain session is `plain`), or None, with a
        warning, where onnxruntime cannot capture it (a node not on CUDA, with
        providers='auto')."""
        image_shape = tuple(plain.get_outputs()[0].shape[1:])
        if not all(isinstance(d, int) for d in image_shape):
            return None
        try:
            return cls(path, options, cuda_options, plain.get_inputs()[0].shape[1], image_shape)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own types; the plain session still works
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warnings.warn(f"{path}: single images decoded without a CUDA graph ({reason})", stacklevel=3)
            return None

    def _run(self, z: np.ndarray) -> np.ndarray:
        self._z.update_inplace(np.ascontiguousarray(z))
        self._session.run_with_iobinding(self._binding)  # returns once the GPU is done
        return self._image.numpy().copy()  # a fresh array: a CPU buffer's .numpy() is a view

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return self._thread.submit(self._run, z).result()

    def close(self) -> None:
        self._thread.shutdown()
