"""Decoder latency and throughput, every figure a ratio against a baseline timed in the same run.

CPU (default): onnxruntime (deploy.Generator) against tf.function and Keras predict.
    .venv/bin/python benchmarks/inference.py --artifact RUN/artifact --model RUN/train \
        [--compare OLD/artifact]
Targets: batch 1 p50 at least 5x faster than tf.function; batch 256 throughput >= 1.0x.
`--compare` also times another artifact's decoder (an older export of the same model).

CUDA: the GPU (every node on CUDA, TF32 off) against all CPU cores, then how far the GPU's
images are from the CPU's. Needs onnxruntime-gpu; no TensorFlow.
    python benchmarks/inference.py --artifact RUN/artifact --providers cuda [--allow-tf32]
Targets: GPU at batch 4,096 >= 10x the CPU; no batch from 256 to 65,536 below batch 256.
"""

import argparse
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def latencies(fns: dict, z, repeats: int, block: int = 10) -> dict[str, np.ndarray]:
    """Seconds per call of each function on `z`, `repeats` calls each, taken in interleaved
    blocks of `block` calls: a change in the machine's load hits every function alike."""
    for fn in fns.values():
        for _ in range(5):
            fn(z)
    times: dict[str, list[float]] = {name: [] for name in fns}
    while len(times[next(iter(fns))]) < repeats:
        for name, fn in fns.items():
            for _ in range(block):
                started = time.perf_counter()
                fn(z)
                times[name].append(time.perf_counter() - started)
    return {name: np.array(t) for name, t in times.items()}


def cpu_comparison(args) -> None:
    import tensorflow as tf

    from deploy import Generator
    from pipeline.training.model_store import load_model

    generators = {"onnxruntime": Generator(args.artifact, providers="cpu")}
    if args.compare:
        generators["onnxruntime (compare)"] = Generator(args.compare, providers="cpu")
    keras_model = load_model(args.model)[0].generator()
    graph = tf.function(lambda z: keras_model(z, training=False), reduce_retracing=True)
    latent = generators["onnxruntime"].latent_dim
    rng = np.random.default_rng(0)
    results = {}
    for batch in (1, 256):
        z = rng.standard_normal((batch, latent)).astype(np.float32)
        repeats = args.repeats if batch == 1 else max(20, args.repeats // 10)
        fns = {name: g.decode for name, g in generators.items()}
        fns["tf.function"] = lambda x: graph(x).numpy()
        fns["keras.predict"] = lambda x: keras_model.predict(x, verbose=0, batch_size=len(x))
        results[batch] = latencies(fns, z, repeats, block=10 if batch == 1 else 2)
    print("batch 1 latency (ms):")
    for name, t in results[1].items():
        print(f"  {name:22s} p50 {np.median(t) * 1e3:8.3f}  p99 {np.percentile(t, 99) * 1e3:8.3f}")
    print("batch 256 throughput (images/s):")
    for name, t in results[256].items():
        print(f"  {name:22s} {256 / np.median(t):10.0f}")
    ort1, tf1 = np.median(results[1]["onnxruntime"]), np.median(results[1]["tf.function"])
    ort256, tf256 = np.median(results[256]["onnxruntime"]), np.median(results[256]["tf.function"])
    print(f"batch 1 speed-up vs tf.function: {tf1 / ort1:.1f}x (target >= 5x)")
    print(f"batch 1 speed-up vs keras.predict: {np.median(results[1]['keras.predict']) / ort1:.1f}x")
    print(f"batch 256 throughput ratio vs tf.function: {tf256 / ort256:.2f}x (target >= 1.0x)")
    if args.compare:
        old1, old256 = np.median(results[1]["onnxruntime (compare)"]), np.median(results[256]["onnxruntime (compare)"])
        print(f"vs --compare: batch 1 {old1 / ort1:.2f}x faster, batch 256 {old256 / ort256:.2f}x the throughput")


def throughput(generator, latent: int, batch: int, seconds: float) -> float:
    """Images/s decoding `batch` latents per call, over at least `seconds` (after a warm-up)."""
    z = np.random.default_rng(batch).standard_normal((batch, latent)).astype(np.float32)
    generator.decode(z)
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        generator.decode(z)
        calls += 1
    return calls * batch / (time.perf_counter() - started)


def cuda_comparison(args) -> None:
    from deploy import Generator

    gpu = Generator(args.artifact, providers="cuda", allow_tf32=args.allow_tf32)
    cpu = Generator(args.artifact, providers="cpu")
    print(f"GPU: {gpu.providers}, TF32 {'on' if args.allow_tf32 else 'off'}; CPU: {cpu.parallel} cores")
    print(f"{'batch':>7s} {'GPU images/s':>14s} {'CPU images/s':>14s} {'ratio':>7s}")
    rates = {}
    for batch in (1, 256, 4096, 65536):
        rates[batch] = (throughput(gpu, gpu.latent_dim, batch, 2.0), throughput(cpu, cpu.latent_dim, batch, 2.0))
        print(f"{batch:7d} {rates[batch][0]:14,.0f} {rates[batch][1]:14,.0f} {rates[batch][0] / rates[batch][1]:6.1f}x")
    print(f"GPU at 4,096 vs all-core CPU: {rates[4096][0] / rates[4096][1]:.1f}x (target >= 10x)")
    lowest = min(rates[b][0] for b in (256, 4096, 65536)) / rates[256][0]
    print(f"lowest GPU rate from 256 to 65,536 / rate at 256: {lowest:.2f} (target >= 1.0)")
    from deploy.generator import provider_options
    from pipeline.onnx.row_fill import provider_agreement

    cuda = ["CUDAExecutionProvider"]
    agreement = provider_agreement(
        os.path.join(args.artifact, "decoder.onnx"), cuda, provider_options(cuda, args.allow_tf32)
    )
    for name, value in agreement.items():
        print(f"GPU vs CPU, {name}: {value:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--providers", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", help="TRAIN_DIR of the same model (CPU comparison)")
    parser.add_argument("--compare", help="another artifact whose decoder is timed too (CPU comparison)")
    parser.add_argument("--allow-tf32", action="store_true", help="CUDA: let convolutions and matmuls use TF32")
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    if args.providers == "cuda":
        cuda_comparison(args)
    elif not args.model:
        parser.error("--model is needed for the CPU comparison against TensorFlow")
    else:
        cpu_comparison(args)


if __name__ == "__main__":
    main()
