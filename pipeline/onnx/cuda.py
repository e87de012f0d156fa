"""Keeping an exported graph whole on onnxruntime's CUDA execution provider.

onnxruntime hands a node to the CPU (and copies tensors back and forth around it) when
the CUDA provider refuses it. `cuda_refusals` lists the patterns it refuses, as its
`GetCapability` and its CPU-placement of shape subgraphs do
(onnxruntime/core/providers/cuda/cuda_execution_provider.cc,
core/framework/fallback_cpu_capability.cc):

- an operator outside `CUDA_OPS`, the plain float32 operators this project's graphs use,
  each with a CUDA kernel at opsets 17 to 21, or any operator outside the default domain;
- `ConvTranspose` with asymmetric `pads` or `auto_pad` SAME_UPPER/SAME_LOWER (cuDNN pads
  both sides alike); tf2onnx writes pads [0, 0, 1, 1] for Keras's stride-2 "same";
- `Shape` and `Size`: their results live in CPU memory, so onnxruntime places the small
  shape computations after them (Gather, Cast, Concat) on the CPU;
- `Cast` to string.

`make_cuda_friendly` rewrites the first two patterns tf2onnx produces with CPU output
that is bit for bit the same: an asymmetric `ConvTranspose` becomes one without padding
followed by a `Slice` that drops what the padding would have cropped, and a `Reshape`
whose target shape is computed from `Shape(x)` (Keras's Flatten with a dynamic batch)
gets the constant shape [-1, ...] instead; the shape nodes, now unused, are removed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

CUDA_OPS = frozenset(
    {
        "Abs", "Add", "Cast", "Concat", "ConstantOfShape", "Conv", "ConvTranspose", "Div", "Elu", "Erf", "Exp",
        "Gather", "Identity", "MatMul", "Gemm", "Mul", "Neg", "ReduceSum", "Relu", "Reshape", "Sigmoid", "Slice",
        "Softplus",
        "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Pow", "Max", "Min",
        "Less", "Where",
    }
)  # fmt: skip
SHAPE_OPS = ("Shape", "Size")


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def cuda_refusals(model: onnx.ModelProto) -> list[str]:
    """One line per node that onnxruntime's CUDA provider would leave to the CPU."""
    refusals = []
    for node in model.graph.node:
        where = f"{node.op_type} {node.name!r}"
        attrs = _attributes(node)
        if node.domain not in ("", "ai.onnx"):
            refusals.append(f"{where}: operator domain {node.domain!r} has no CUDA kernel here")
        elif node.op_type in SHAPE_OPS:
            refusals.append(f"{where}: its result is in CPU memory, so what computes on it runs on the CPU")
        elif node.op_type not in CUDA_OPS:
            refusals.append(f"{where}: not among the operators checked to have a CUDA kernel")
        elif node.op_type == "ConvTranspose":
            pads = list(attrs.get("pads", []))
            half = len(pads) // 2
            if pads[:half] != pads[half:]:
                refusals.append(f"{where}: asymmetric pads {pads} (cuDNN pads both sides alike)")
            if attrs.get("auto_pad", b"NOTSET") in (b"SAME_UPPER", b"SAME_LOWER"):
                refusals.append(f"{where}: auto_pad {attrs['auto_pad'].decode()} may pad asymmetrically")
        elif node.op_type == "Cast" and attrs.get("to") == onnx.TensorProto.STRING:
            refusals.append(f"{where}: a cast to string")
    return refusals


def make_cuda_friendly(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite asymmetric ConvTranspose pads and Shape-computed Reshape targets (see the
    module docstring); CPU outputs stay bit-identical. Edits `model` in place."""
    _pad_free_conv_transposes(model.graph)
    _constant_reshape_targets(model)
    prune(model)
    return model


def _pad_free_conv_transposes(graph: onnx.GraphProto) -> None:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "ConvTranspose":
            continue
        attrs = _attributes(node)
        pads = list(attrs.get("pads", []))
        half = len(pads) // 2
        if pads[:half] == pads[half:] or "output_shape" in attrs:
            continue
        # ConvTranspose with pads (b, e) per axis = the unpadded result cropped by b at
        # the start and e at the end of each spatial axis (N, C, spatial...).
        output = node.output[0]
        unpadded = f"{output}/unpadded"
        node.output[0] = unpadded
        for attribute in node.attribute:
            if attribute.name == "pads":
                attribute.CopyFrom(helper.make_attribute("pads", [0] * len(pads)))
        begins, ends = pads[:half], pads[half:]
        axes = list(range(2, 2 + half))
        constants = {
            "starts": begins,
            "ends": [-e if e else np.iinfo(np.int64).max for e in ends],
            "axes": axes,
        }
        inputs = [unpadded]
        for key, value in constants.items():
            name = f"{output}/crop_{key}"
            graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
            inputs.append(name)
        nodes.append(helper.make_node("Slice", inputs, [output], name=f"{node.name}/crop"))
    del graph.node[:]
    graph.node.extend(nodes)


def _constant_reshape_targets(model: onnx.ModelProto) -> None:
    """A Reshape whose target is computed and whose output shape is known but for its
    first (batch) dimension gets the constant target [-1, d1, d2, ...]."""
    graph = model.graph
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.output]
    }
    constants = {init.name for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] in constants:
            continue
        shape = shapes.get(node.output[0])
        if not shape or any(d is None for d in shape[1:]):
            continue
        name = f"{node.output[0]}/target"
        graph.initializer.append(numpy_helper.from_array(np.array([-1, *shape[1:]], np.int64), name))
        node.input[1] = name


def prune(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing uses, then initializers nothing reads."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
