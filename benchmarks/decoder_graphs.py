"""Time of decoder graphs side by side, calls interleaved.

CPU (one intra-op thread):
    .venv/bin/python benchmarks/decoder_graphs.py OLD/decoder.onnx NEW/decoder.onnx --rewrite-first
`--rewrite-first` adds the first graph after `pipeline.onnx.cuda.make_cuda_friendly` only,
which separates what the CUDA rewrite costs from what the row fill saves.

CUDA (onnxruntime-gpu, TF32 off; nodes CUDA refuses run on the CPU, as `providers="auto"`):
    python benchmarks/decoder_graphs.py OLD.onnx NEW.onnx --providers cuda
Each graph three ways: `host` (session.run, numpy in and out: what a plain caller pays),
`device` (I/O binding, z and the image in GPU memory: the graph's own time) and
`cuda graph` (the same, replayed as one captured CUDA graph; only for a graph wholly on
CUDA, as onnxruntime requires).
"""

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def session(model: onnx.ModelProto, providers: str, cuda_graph: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if providers == "cpu":
        options.intra_op_num_threads = 1
        return ort.InferenceSession(model.SerializeToString(), options, providers=[CPU])
    cuda = {"use_tf32": "0", "enable_cuda_graph": "1" if cuda_graph else "0"}
    return ort.InferenceSession(model.SerializeToString(), options, providers=[(CUDA, cuda), CPU])


def bound_call(sess: ort.InferenceSession, z: np.ndarray):
    """A call that runs `sess` on z already in GPU memory into an output buffer there."""
    output = sess.get_outputs()[0]
    z_gpu = ort.OrtValue.ortvalue_from_numpy(z, "cuda", 0)
    shape = [len(z), *output.shape[1:]]
    image_gpu = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", 0)
    binding = sess.io_binding()
    binding.bind_ortvalue_input(sess.get_inputs()[0].name, z_gpu)
    binding.bind_ortvalue_output(output.name, image_gpu)
    sess.run_with_iobinding(binding)  # a CUDA-graph session captures here

    def call(_):
        sess.run_with_iobinding(binding)  # synchronises with the GPU before it returns

    call.result = image_gpu
    return call


def cuda_calls(name: str, model: onnx.ModelProto, z: np.ndarray) -> dict:
    sess = session(model, "cuda")
    calls = {f"{name} host": lambda x: sess.run(None, {"z": x}), f"{name} device": bound_call(sess, z)}
    try:
        calls[f"{name} cuda graph"] = bound_call(session(model, "cuda", cuda_graph=True), z)
    except Exception as error:  # noqa: BLE001 - onnxruntime refuses a graph not wholly on CUDA
        print(f"{name}: no CUDA graph ({str(error).splitlines()[0][:120]})")
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="+")
    parser.add_argument("--rewrite-first", action="store_true")
    parser.add_argument("--providers", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=300, help="rounds at batch 1 (a tenth at batch 256)")
    args = parser.parse_args()
    models = {path: onnx.load(path) for path in args.graphs}
    if args.rewrite_first:
        from pipeline.onnx.cuda import make_cuda_friendly

        models[f"{args.graphs[0]} + CUDA rewrite"] = make_cuda_friendly(onnx.load(args.graphs[0]))
    if args.providers == "cuda" and CUDA not in ort.get_available_providers():
        parser.error(f"this onnxruntime offers only {ort.get_available_providers()}")
    latent = next(iter(models.values())).graph.input[0].type.tensor_type.shape.dim[1].dim_value
    cpu_sessions = {name: session(model, "cpu") for name, model in models.items()} if args.providers == "cpu" else {}
    for batch, rounds in ((1, args.rounds), (256, max(10, args.rounds // 10))):
        z = np.random.default_rng(0).standard_normal((batch, latent)).astype(np.float32)
        if args.providers == "cpu":
            calls = {name: (lambda x, s=s: s.run(None, {"z": x})) for name, s in cpu_sessions.items()}
            graph_of = {name: name for name in calls}
        else:
            calls, graph_of = {}, {}
            for name, model in models.items():
                own = cuda_calls(name, model, z)
                calls.update(own)
                graph_of.update(dict.fromkeys(own, name))
        for call in calls.values():
            for _ in range(10):
                call(z)
        times = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                started = time.perf_counter()
                call(z)
                times[name].append(time.perf_counter() - started)
        for name, t in times.items():
            nodes = len(models[graph_of[name]].graph.node)
            print(
                f"batch {batch:3d}  p50 {np.median(t) * 1e3:8.3f} ms  p90 {np.percentile(t, 90) * 1e3:8.3f} ms"
                f"  {nodes:4d} nodes  {name}"
            )


if __name__ == "__main__":
    main()
