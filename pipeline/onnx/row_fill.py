"""The decoder's row-by-row fill, written straight into the ONNX graph.

tf2onnx turns Keras's fill (`vae.context.fill_rows`) into about 260 nodes: per row Slices
and Squeezes for each operand, an Unsqueeze and a Sub for the context. Single-image decoding
paid for that count (on the CPU about 0.25 ms of a 0.6 ms call; on a GPU each node is a
kernel launch). This module appends the same recurrence to the converted decoder in a few
nodes per row:

    base0 = base - 0.5 * sum_k weights_k            folded into the last convolution's weights
    p_i = sigmoid(base0_i + sum_k w_ik * p[i + di_k][j + dj_k])   per row

The two forms are the same sum (Keras centres each context pixel, p - 0.5, and pads
with -0.5; here the -0.5 is folded into base0 and the padding is 0). With one context
pixel straight above (context "above") the convolution's output is split into rows by
one Split, a row costs Mul, Add and Sigmoid, and one Concat joins the rows into the
image; other contexts ("rows", the default) cost Concat, Gather, Mul, ReduceSum and
Sigmoid a row, the base counted as one more weight on a neighbour that is always 1. The
export check verifies every row against Keras given the same rows above, as before.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# base logit and context weights: (N, H, W, 1 + K) from tf2onnx; in the fill (N, 1 + K, H, W),
# the base with the context's centring folded in (base0 above)
DECODED = "decoded"
IMAGE = "image"


class _Graph:
    """Appends nodes and constants to a graph under one name prefix."""

    def __init__(self, graph: onnx.GraphProto, prefix: str):
        self.graph, self.prefix, self.count = graph, prefix, 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}/{hint}_{self.count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: int | list[str] = 1, **attrs) -> list[str]:
        names = outputs if isinstance(outputs, list) else [self.name(op.lower()) for _ in range(outputs)]
        self.graph.node.append(helper.make_node(op, inputs, names, name=self.name(op), **attrs))
        return names

    def one(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        return self.node(op, inputs, [output] if output else 1, **attrs)[0]


def append_row_fill(
    model: onnx.ModelProto, offsets, height: int, width: int, likelihood: str = "bernoulli"
) -> onnx.ModelProto:
    """Replace the graph output `decoded` (N, H, W, 1 + K) by `image` (N, H, W, 1): pixel
    means filled row by row from the rows above (context `offsets`, as in vae.context),
    or the mean of `decoded` without a context. Edits `model` in place.

    The fill works on the convolution's own layout, (N, 1 + K, H, W): the tensor named
    `decoded` in the result (see `with_decoded_output`)."""
    graph = model.graph
    if [o.name for o in graph.output] != [DECODED]:
        raise ValueError(f"expected one graph output {DECODED!r}, got {[o.name for o in graph.output]}")
    g = _Graph(graph, "row_fill")
    _channels_first(graph, g)
    offsets = tuple(tuple(o) for o in offsets)
    mean = _mean_nodes(likelihood)
    if offsets:
        _centre(g, len(offsets))
    if len(offsets) == 1 and offsets[0][1] == 0:  # one context pixel, straight above: rows of (N, 1, W, 1)
        g.one("Concat", _fill_above(g, offsets[0][0], height, width, mean), IMAGE, axis=1)
    else:
        if not offsets:
            probabilities = mean(g, DECODED)  # (N, 1, H, W)
        else:
            probabilities = g.one("Concat", _fill(g, offsets, height, width, mean), axis=2)
        # one channel: (N, 1, H, W) and (N, H, W, 1) hold the same numbers in the same order
        g.one("Reshape", [probabilities, g.const("shape", np.array([-1, height, width, 1], np.int64))], IMAGE)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(IMAGE, TensorProto.FLOAT, ["batch", height, width, 1]))
    return model


def _channels_first(graph: onnx.GraphProto, g: _Graph) -> None:
    """Make `decoded` the (N, C, H, W) tensor: tf2onnx ends the decoder with a Transpose
    from the convolution's NCHW to Keras's NHWC; drop it (or add the inverse if absent)."""
    producer = next(n for n in graph.node if DECODED in n.output)
    perm = [a.ints for a in producer.attribute if a.name == "perm"]
    if producer.op_type == "Transpose" and perm and list(perm[0]) == [0, 2, 3, 1]:
        source = producer.input[0]
        graph.node.remove(producer)
        for node in graph.node:
            node.output[:] = [DECODED if name == source else name for name in node.output]
            node.input[:] = [DECODED if name == source else name for name in node.input]
    else:
        producer.output[:] = [f"{DECODED}_nhwc" if name == DECODED else name for name in producer.output]
        g.one("Transpose", [f"{DECODED}_nhwc"], DECODED, perm=[0, 3, 1, 2])


def _mean_nodes(likelihood: str):
    """g, logits -> the pixel mean's nodes: one Sigmoid for the Bernoulli; for the
    continuous Bernoulli the formula of vae.objective.pixel_mean, node for node."""
    if likelihood == "bernoulli":
        return lambda g, logits: g.one("Sigmoid", [logits])
    if likelihood != "continuous_bernoulli":
        raise ValueError(f"unknown likelihood {likelihood!r}")
    from vae.objective import CB_SERIES_BELOW

    constants: dict[str, str] = {}  # one initializer each, shared by every row

    def const(g: _Graph, name: str, value: float) -> str:
        if name not in constants:
            constants[name] = g.const(name, np.float32(value))
        return constants[name]

    def mean(g: _Graph, logits: str) -> str:
        below, one = const(g, "below", CB_SERIES_BELOW), const(g, "one", 1.0)
        small = g.one("Less", [g.one("Abs", [logits]), below])
        safe = g.one("Where", [small, below, logits])
        tail = g.one("Div", [one, g.one("Sub", [one, g.one("Exp", [g.one("Neg", [safe])])])])
        exact = g.one("Sub", [tail, g.one("Div", [one, safe])])
        square = g.one("Mul", [logits, logits])
        inner = g.one("Add", [const(g, "c5", -1.0 / 720.0), g.one("Mul", [square, const(g, "c7", 1.0 / 30240.0)])])
        inner = g.one("Add", [const(g, "c3", 1.0 / 12.0), g.one("Mul", [square, inner])])
        series = g.one("Add", [const(g, "half", 0.5), g.one("Mul", [logits, inner])])
        return g.one("Where", [small, series, exact])

    return mean


def _centre(g: _Graph, k: int) -> None:
    """Make channel 0 of `decoded` base0 = base - 0.5 * sum_k weights_k: in the weights and
    bias of the convolution that computes it (a linear map, so the same sum), else in two
    nodes after it."""
    graph = g.graph
    producer = next(n for n in graph.node if DECODED in n.output)
    initializers = {i.name: i for i in graph.initializer}
    users = [name for n in graph.node for name in n.input]
    folded = (
        producer.op_type == "ConvTranspose"
        and len(producer.input) in (2, 3)
        and all(name in initializers and users.count(name) == 1 for name in producer.input[1:])
        and all(a.i == 1 for a in producer.attribute if a.name == "group")
    )
    if folded:  # ConvTranspose weights are (C_in, C_out, kh, kw); the bias is optional
        weight = initializers[producer.input[1]]
        w = numpy_helper.to_array(weight).astype(np.float64)
        if len(producer.input) == 2:
            producer.input.append(g.const("bias", np.zeros(w.shape[1], np.float32)))
        bias = next(i for i in graph.initializer if i.name == producer.input[2])
        b = numpy_helper.to_array(bias).astype(np.float64)
        w[:, 0] -= 0.5 * w[:, 1:].sum(axis=1)
        b[0] -= 0.5 * b[1:].sum()
        weight.CopyFrom(numpy_helper.from_array(w.astype(np.float32), weight.name))
        bias.CopyFrom(numpy_helper.from_array(b.astype(np.float32), bias.name))
        return
    producer.output[:] = [f"{DECODED}_uncentred" if name == DECODED else name for name in producer.output]
    base, weights = g.node("Split", [f"{DECODED}_uncentred", g.const("split", np.array([1, k], np.int64))], 2, axis=1)
    weight_sum = weights if k == 1 else g.one("ReduceSum", [weights, g.const("axis", np.array([1], np.int64))])
    base0 = g.one("Sub", [base, g.one("Mul", [weight_sum, g.const("half", np.float32(0.5))])])
    g.one("Concat", [base0, weights], DECODED, axis=1)


def _fill_above(g: _Graph, di: int, height: int, width: int, mean) -> list[str]:
    """Rows p_0 .. p_{H-1}, each (N, 1, W, 1), with the one context pixel `di` rows straight
    above: (N, 2, H, W) viewed as (N, 2H, W, 1) is split into the H base rows and the H
    weight rows by one Split; a row is Mul, Add and the mean."""
    rows_of_both = g.one("Reshape", [DECODED, g.const("shape", np.array([-1, 2 * height, width, 1], np.int64))])
    parts = g.node("Split", [rows_of_both, g.const("rows", np.ones(2 * height, np.int64))], 2 * height, axis=1)
    base_rows, weight_rows = parts[:height], parts[height:]
    rows: list[str] = []
    for i in range(height):
        logit = (
            base_rows[i] if i + di < 0 else g.one("Add", [base_rows[i], g.one("Mul", [weight_rows[i], rows[i + di]])])
        )
        rows.append(mean(g, logit))
    return rows


def _fill(g: _Graph, offsets, height: int, width: int, mean) -> list[str]:
    """Nodes for rows p_0 .. p_{H-1}, each (N, 1, 1, W), any context; returns their names.

    A row's logit is one weighted sum, sum_k w_ik * n_ik with the base as weight 0 on a
    neighbour that is always 1: Concat (the rows it reads and a column of ones), Gather,
    Mul and ReduceSum, then the mean."""
    # per row (N, 1, 1, 1 + K, W): the base and the K weights, a weight 0 where its neighbour is off the image
    mask = np.array([[1.0] * width] + [[0 <= j + dj < width for j in range(width)] for _, dj in offsets], np.float32)
    by_row = g.one("Transpose", [DECODED], perm=[0, 2, 1, 3])  # (N, H, 1 + K, W)
    by_row = g.one("Unsqueeze", [by_row, g.const("axis", np.array([2], np.int64))])  # (N, H, 1, 1 + K, W)
    masked = g.one("Mul", [by_row, g.const("mask", mask[None, None, None])])
    weight_rows = g.node("Split", [masked, g.const("rows", np.ones(height, np.int64))], height, axis=1)
    # (N, 1, 1, 1) of ones: x ** 0 is 1 for every x
    starts, ends, axes = (
        g.const(hint, np.array(v, np.int64))
        for hint, v in (("starts", [0] * 3), ("ends", [1] * 3), ("axes", [1, 2, 3]))
    )
    corner = g.one("Slice", [DECODED, starts, ends, axes])
    ones = g.one("Pow", [corner, g.const("zero", np.float32(0.0))])
    rows: list[str] = []
    for i in range(height):
        inside = [(index, di, dj) for index, (di, dj) in enumerate(offsets) if i + di >= 0]
        if not inside:  # every context pixel is above the image (background): the base alone
            logit = g.one("Gather", [weight_rows[i], g.const("base", np.array(0, np.int64))], axis=3)
        else:
            logit = _weighted_sum(g, rows, ones, weight_rows[i], i, inside, len(offsets), width)
        rows.append(mean(g, logit))
    return rows


def _weighted_sum(g: _Graph, rows: list[str], ones: str, weight_row: str, i: int, inside, k: int, width: int) -> str:
    """base_i + sum_k w_ik * p[i + di_k][j + dj_k] for row i, (N, 1, 1, W): the neighbours
    and a 1 for the base by one Gather, then Mul and ReduceSum."""
    sources = sorted({i + di for _, di, _ in inside})
    source = g.one("Concat", [*(rows[r] for r in sources), ones], axis=3)  # (N, 1, 1, S * W + 1)
    one = len(sources) * width
    index = np.array(
        [[one] * width]
        + [
            [sources.index(i + di) * width + min(max(j + dj, 0), width - 1) for j in range(width)]
            for _, di, dj in inside
        ],
        np.int64,
    )
    neighbours = g.one("Gather", [source, g.const("index", index)], axis=3)  # (N, 1, 1, 1 + K', W)
    if len(inside) < k:  # some context pixels are above the image: only the others' weights
        channels = np.array([0] + [o + 1 for o, _, _ in inside], np.int64)
        weight_row = g.one("Gather", [weight_row, g.const("k", channels)], axis=3)
    product = g.one("Mul", [weight_row, neighbours])
    return g.one("ReduceSum", [product, g.const("axis", np.array([3], np.int64))], keepdims=0)


def with_decoded_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an exported decoder that also outputs `decoded` (N, 1 + K, H, W), the
    centred base logits and context weights the fill starts from: what a row-by-row check
    on another execution provider needs (see `row_logits`)."""
    model = copy.deepcopy(model)
    model.graph.output.append(helper.make_tensor_value_info(DECODED, TensorProto.FLOAT, None))
    return model


def row_logits(decoded: np.ndarray, images: np.ndarray, offsets) -> np.ndarray:
    """numpy: each pixel's logit (N, H, W) given the rows above it in `images` (N, H, W, 1),
    from the graph's `decoded` (N, 1 + K, H, W), whose base is centred (base0). The same sum
    as vae.context.context_logits, for checking a fill computed elsewhere (another
    execution provider) row by row."""
    base0, weights = decoded[:, 0].astype(np.float64), decoded[:, 1:].astype(np.float64)
    pixels = images[..., 0].astype(np.float64)
    height, width = pixels.shape[1:]
    logits = base0.copy()
    for index, (di, dj) in enumerate(offsets):
        padded = np.pad(pixels, [(0, 0), (max(-di, 0), max(di, 0)), (max(-dj, 0), max(dj, 0))], constant_values=0.0)
        top, left = max(di, 0), max(dj, 0)
        logits += weights[:, index] * padded[:, top : top + height, left : left + width]
    return logits


def provider_agreement(decoder_path, providers: list[str], options: list[dict], count: int = 4096) -> dict[str, float]:
    """How far an exported decoder on other onnxruntime `providers` is from the CPU, on
    `count` standard-normal latents: every row against the row the CPU's base logits and
    context weights give from the *same* rows above (as the export check does against
    Keras), and the whole images, where a small difference in one row moves the rows below."""
    import json

    import onnxruntime as ort

    from vae.config import CONTEXTS

    proto = with_decoded_output(onnx.load(str(decoder_path)))
    architecture = json.loads({p.key: p.value for p in proto.metadata_props}["architecture"])
    context = architecture.get("context", "none")
    latent = proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    feed = {"z": np.random.default_rng(1).standard_normal((count, latent)).astype(np.float32)}
    model = proto.SerializeToString()
    cpu_image, cpu_decoded = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feed)
    image, _ = ort.InferenceSession(model, providers=providers, provider_options=options).run(None, feed)
    logits = row_logits(cpu_decoded, image, CONTEXTS[context])
    if architecture.get("likelihood", "bernoulli") == "continuous_bernoulli":
        from vae.continuous_bernoulli import cb_mean

        rows = cb_mean(logits)
    else:
        rows = 1 / (1 + np.exp(-logits))
    return {
        "rows given the same rows above, max": float(np.abs(rows[..., None] - image).max()),
        "whole images, max": float(np.abs(image - cpu_image).max()),
        "whole images, mean": float(np.abs(image - cpu_image).mean()),
    }
