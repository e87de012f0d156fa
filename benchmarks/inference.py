"""Decoder latency and throughput: onnxruntime (deploy.Generator) vs tf.function vs Keras predict.

    .venv/bin/python benchmarks/inference.py --artifact RUN/artifact --model RUN/train
Targets: batch 1 p50 at least 5x faster than tf.function; batch 256 throughput >= 1.0x.
"""

import argparse
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def latencies(fn, z, repeats):
    for _ in range(10):
        fn(z)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(z)
        times.append(time.perf_counter() - started)
    return np.array(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--model", required=True, help="TRAIN_DIR of the same model")
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    import tensorflow as tf

    from deploy import Generator
    from pipeline.model_store import load_model

    generator = Generator(args.artifact, providers="cpu")
    keras_model = load_model(args.model)[0].generator()
    graph = tf.function(lambda z: keras_model(z, training=False), reduce_retracing=True)
    rng = np.random.default_rng(0)
    results = {}
    for batch in (1, 256):
        z = rng.standard_normal((batch, generator.latent_dim)).astype(np.float32)
        repeats = args.repeats if batch == 1 else max(20, args.repeats // 10)
        results[batch] = {
            "onnxruntime": latencies(generator.decode, z, repeats),
            "tf.function": latencies(lambda x: graph(x).numpy(), z, repeats),
            "keras.predict": latencies(lambda x: keras_model.predict(x, verbose=0, batch_size=len(x)), z, repeats),
        }
    print("batch 1 latency (ms):")
    for name, t in results[1].items():
        print(f"  {name:14s} p50 {np.median(t) * 1e3:8.3f}  p99 {np.percentile(t, 99) * 1e3:8.3f}")
    print("batch 256 throughput (images/s):")
    for name, t in results[256].items():
        print(f"  {name:14s} {256 / np.median(t):10.0f}")
    ort1, tf1 = np.median(results[1]["onnxruntime"]), np.median(results[1]["tf.function"])
    ort256, tf256 = np.median(results[256]["onnxruntime"]), np.median(results[256]["tf.function"])
    print(f"batch 1 speed-up vs tf.function: {tf1 / ort1:.1f}x (target >= 5x)")
    print(f"batch 1 speed-up vs keras.predict: {np.median(results[1]['keras.predict']) / ort1:.1f}x")
    print(f"batch 256 throughput ratio vs tf.function: {tf256 / ort256:.2f}x (target >= 1.0x)")


if __name__ == "__main__":
    main()
