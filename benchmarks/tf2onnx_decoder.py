"""The decoder as tf2onnx writes it, row fill included (the ~275-node graph exported before
`pipeline.onnx.row_fill`), with the CUDA rewrite, as a baseline for benchmarks/decoder_graphs.py.

    .venv/bin/python benchmarks/tf2onnx_decoder.py RUN/train OLD.onnx
    python benchmarks/decoder_graphs.py OLD.onnx RUN/artifact/decoder.onnx [--providers cuda]
"""

import argparse
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args()
    import onnx
    import tensorflow as tf

    from pipeline.onnx.convert import convert
    from pipeline.onnx.cuda import cuda_refusals, make_cuda_friendly
    from pipeline.training.model_store import load_model

    model = load_model(args.train_dir)[0]
    generator = model.generator()

    @tf.function
    def decode(z):
        return generator(z, training=False)

    spec = [tf.TensorSpec([None, model.config.latent_dim], tf.float32, name="z")]
    proto = make_cuda_friendly(convert(decode, spec, args.opset, ["image"]))
    onnx.save(proto, args.out)
    print(f"{args.out}: {len(proto.graph.node)} nodes, {Counter(n.op_type for n in proto.graph.node).most_common(7)}")
    for refusal in cuda_refusals(proto):
        print(f"runs on the CPU under providers='auto': {refusal}")


if __name__ == "__main__":
    main()
