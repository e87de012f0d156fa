"""CPU time of decoder graphs side by side: one intra-op thread, calls interleaved.

    .venv/bin/python benchmarks/decoder_graphs.py OLD/decoder.onnx NEW/decoder.onnx --rewrite-first
`--rewrite-first` adds the first graph after `pipeline.onnx_cuda.make_cuda_friendly` only,
which separates what the CUDA rewrite costs from what the row fill saves.
"""

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="+")
    parser.add_argument("--rewrite-first", action="store_true")
    parser.add_argument("--rounds", type=int, default=300, help="rounds at batch 1 (a tenth at batch 256)")
    args = parser.parse_args()
    models = {path: onnx.load(path) for path in args.graphs}
    if args.rewrite_first:
        from pipeline.onnx_cuda import make_cuda_friendly

        models[f"{args.graphs[0]} + CUDA rewrite"] = make_cuda_friendly(onnx.load(args.graphs[0]))
    sessions = {name: session(model) for name, model in models.items()}
    latent = next(iter(models.values())).graph.input[0].type.tensor_type.shape.dim[1].dim_value
    for batch, rounds in ((1, args.rounds), (256, max(10, args.rounds // 10))):
        z = np.random.default_rng(0).standard_normal((batch, latent)).astype(np.float32)
        times = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, s in sessions.items():
                started = time.perf_counter()
                s.run(None, {"z": z})
                times[name].append(time.perf_counter() - started)
        for name, t in times.items():
            print(f"batch {batch:3d}  p50 {np.median(t) * 1e3:8.3f} ms  {len(models[name].graph.node):4d} nodes  {name}")


if __name__ == "__main__":
    main()
