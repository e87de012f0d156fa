"""The exported graphs: whole on onnxruntime's CUDA provider, and the row fill in few nodes.

Run on the CPU: the CUDA provider's refusals are checked on the graph itself, and every
rewrite is checked against onnxruntime's CPU output.
"""

import collections
import copy
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from pipeline.onnx.convert import tf2onnx_graphs
from pipeline.onnx.cuda import cuda_refusals, make_cuda_friendly
from pipeline.onnx.parity import row_by_row_reference
from pipeline.onnx.row_fill import (
    append_row_fill,
    provider_agreement,
    row_logits,
    with_decoded_output,
)
from vae.config import CONTEXTS, VAEConfig, preset


def run(proto: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


@pytest.fixture(scope="module")
def default_model():
    from vae.model import build_vae

    return build_vae(preset("default"), seed=0)


def test_exported_graphs_hold_no_node_the_cuda_provider_refuses(artifact):
    for name in ("decoder.onnx", "encoder.onnx"):
        proto = onnx.load(str(artifact.out / name))
        assert cuda_refusals(proto) == [], name
        assert not any(n.op_type in ("Shape", "Size") for n in proto.graph.node)
    card = artifact.card["execution_providers"]
    assert card["CPUExecutionProvider"].startswith("run and verified")
    assert "CUDAExecutionProvider" in card


def test_what_tf2onnx_writes_is_refused_and_the_rewrite_keeps_cpu_outputs_bit_identical(default_model):
    decoder, encoder = tf2onnx_graphs(default_model, 17)
    refused = cuda_refusals(decoder) + cuda_refusals(encoder)
    assert sum("asymmetric pads [0, 0, 1, 1]" in line for line in refused) == 2  # the two stride-2 upconvolutions
    rng = np.random.default_rng(0)
    z = rng.standard_normal((65, default_model.config.latent_dim)).astype(np.float32)
    images = rng.uniform(size=(65, 28, 28, 1)).astype(np.float32)
    for proto, feed in ((decoder, {"z": z}), (encoder, {"image": images})):
        rewritten = make_cuda_friendly(copy.deepcopy(proto))
        assert cuda_refusals(rewritten) == []
        onnx.checker.check_model(rewritten, full_check=True)
        for rows in (slice(0, 1), slice(0, 65)):
            batch = {k: v[rows] for k, v in feed.items()}
            for before, after in zip(run(proto, batch), run(rewritten, batch), strict=True):
                assert np.array_equal(before, after)


def test_a_reshape_computed_from_shape_gets_a_constant_target():
    """Keras's Flatten with a dynamic batch, as tf2onnx writes it in some traces:
    Shape -> Gather -> Concat -> Reshape. The Shape node is refused; the rewrite gives the
    Reshape the constant target [-1, 98] and removes the shape nodes."""
    i64 = lambda name, values: helper.make_tensor(name, TensorProto.INT64, [len(values)], values)  # noqa: E731
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("Shape", ["h"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "flat_size"], ["target"], axis=0),
        helper.make_node("Reshape", ["h", "target"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["y"]),
    ]
    w = np.random.default_rng(4).standard_normal((98, 3)).astype(np.float32)
    graph = helper.make_graph(
        nodes,
        "flatten",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [i64("zero", [0]), i64("flat_size", [98]), onnx.numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [line.split()[0] for line in cuda_refusals(model)] == ["Shape"]
    rewritten = make_cuda_friendly(copy.deepcopy(model))
    assert cuda_refusals(rewritten) == []
    assert [n.op_type for n in rewritten.graph.node] == ["Relu", "Reshape", "MatMul"]
    x = np.random.default_rng(5).standard_normal((5, 2, 7, 7)).astype(np.float32)
    assert np.array_equal(run(model, {"x": x})[0], run(rewritten, {"x": x})[0])


def graph_with(node: onnx.NodeProto, inputs, output_type=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in inputs],
        [helper.make_tensor_value_info(node.output[0], output_type, None)],
    )
    return helper.make_model(graph)


@pytest.mark.parametrize(
    ("node", "inputs", "message"),
    [
        (
            helper.make_node("ConvTranspose", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2]),
            ["x", "w"],
            "auto_pad",
        ),
        (helper.make_node("ConvTranspose", ["x", "w"], ["y"], pads=[1, 0, 1, 1]), ["x", "w"], "asymmetric pads"),
        (helper.make_node("Cast", ["x"], ["y"], to=TensorProto.STRING), ["x"], "cast to string"),
        (helper.make_node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft"), ["x", "w"], "domain"),
        (helper.make_node("NonZero", ["x"], ["y"]), ["x"], "not among the operators"),
        (helper.make_node("Size", ["x"], ["y"]), ["x"], "CPU memory"),
    ],
)
def test_each_pattern_the_cuda_provider_refuses_is_named(node, inputs, message):
    refusals = cuda_refusals(graph_with(node, inputs))
    assert len(refusals) == 1 and message in refusals[0]
    assert (
        cuda_refusals(graph_with(helper.make_node("ConvTranspose", ["x", "w"], ["y"], pads=[1, 1, 1, 1]), inputs)) == []
    )


def fill_graph(model):
    decoder, _ = tf2onnx_graphs(model, 17)
    make_cuda_friendly(decoder)
    return append_row_fill(decoder, CONTEXTS[model.config.context], 28, 28, model.config.likelihood)


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli"])
@pytest.mark.parametrize("context", sorted(CONTEXTS))
def test_the_onnx_row_fill_matches_keras_row_by_row(context, likelihood):
    from vae.continuous_bernoulli import cb_mean
    from vae.model import build_vae

    model = build_vae(VAEConfig(latent_dim=3, context=context, likelihood=likelihood), seed=1)
    proto = fill_graph(model)
    assert cuda_refusals(proto) == []
    onnx.checker.check_model(proto, full_check=True)
    z = np.random.default_rng(2).standard_normal((9, 3)).astype(np.float32) * 2
    image = run(proto, {"z": z})[0]
    assert image.shape == (9, 28, 28, 1) and image.min() >= 0 and image.max() <= 1
    tolerance = 1e-6 if likelihood == "bernoulli" else 1e-5  # the CB mean divides by 1 - exp(-l)
    reference = np.asarray(row_by_row_reference(model)(z, [image]))
    assert np.abs(reference - image).max() < tolerance
    np.testing.assert_allclose(image, np.asarray(model.generator()(z)), atol=1e-4)  # whole images
    # the numpy mirror used to check other execution providers row by row
    decoded = run(with_decoded_output(proto), {"z": z})[1]
    logits = row_logits(decoded, image, CONTEXTS[context])
    mirror = (1 / (1 + np.exp(-logits)) if likelihood == "bernoulli" else cb_mean(logits))[..., None]
    assert np.abs(mirror - image).max() < tolerance


def test_row_logits_is_the_teacher_forced_sum_keras_trains_on():
    from vae.context import context_logits

    rng = np.random.default_rng(3)
    for offsets in CONTEXTS.values():
        decoded = rng.standard_normal((4, 28, 28, 1 + len(offsets))).astype(np.float32)
        images = rng.uniform(size=(4, 28, 28, 1)).astype(np.float32)
        expected = np.asarray(context_logits(decoded, images, offsets))[..., 0]
        channels_first = decoded.transpose(0, 3, 1, 2).copy()  # as the exported graph holds it,
        channels_first[:, 0] -= 0.5 * channels_first[:, 1:].sum(axis=1)  # with the base centred
        np.testing.assert_allclose(row_logits(channels_first, images, offsets), expected, atol=1e-5)


def test_the_default_decoder_fills_a_row_in_five_nodes(default_model):
    """Context "rows" (the default): per row below the first two, Concat, Gather, Mul,
    ReduceSum and Sigmoid; tf2onnx's own fill took ~260 nodes, ours six a row (Add apart)
    before the base became a weight on a column of ones."""
    proto = fill_graph(default_model)
    fill = collections.Counter(n.op_type for n in proto.graph.node if n.name.startswith("row_fill/"))
    assert fill["Sigmoid"] == 28 and fill["ReduceSum"] == 27 and fill["Concat"] == 28, fill  # and the join
    assert fill["Gather"] == 29  # row 0's base; row 1's three weights of the four; 27 rows' neighbours
    assert sum(fill.values()) <= 5 * 28 + 10 and len(proto.graph.node) <= 160


def test_the_above_decoder_fills_a_row_in_three_nodes():
    """Context "above": one Reshape and one Split make the rows, Mul, Add and Sigmoid fill
    each row below the first, one Concat joins them; tf2onnx's own fill took ~190 nodes."""
    from vae.model import build_vae

    proto = fill_graph(build_vae(dataclasses.replace(preset("default"), context="above"), seed=0))
    fill = collections.Counter(n.op_type for n in proto.graph.node if n.name.startswith("row_fill/"))
    assert fill == {"Reshape": 1, "Split": 1, "Sigmoid": 28, "Mul": 27, "Add": 27, "Concat": 1}, fill
    assert len(proto.graph.node) <= 100


def test_the_fill_centres_the_base_in_nodes_when_no_convolution_computes_it():
    """The -0.5 centring goes into the last convolution's weights when it can (above); a
    decoder ending in anything else gets it as nodes, with the same image."""
    height = width = 4
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 2, height, width])
    nodes = [
        helper.make_node("Identity", ["t"], ["mid"]),
        helper.make_node("Transpose", ["mid"], ["decoded"], perm=[0, 2, 3, 1]),  # as tf2onnx ends
    ]
    out = helper.make_tensor_value_info("decoded", TensorProto.FLOAT, None)
    proto = helper.make_model(helper.make_graph(nodes, "g", [t], [out]), opset_imports=[helper.make_opsetid("", 17)])
    append_row_fill(proto, CONTEXTS["above"], height, width)
    assert {"Sub", "Concat"} <= {n.op_type for n in proto.graph.node}
    decoded = np.random.default_rng(4).standard_normal((3, 2, height, width)).astype(np.float32)
    image = run(proto, {"t": decoded})[0]
    base, weight = decoded[:, 0].astype(np.float64), decoded[:, 1].astype(np.float64)
    expected, above = np.empty_like(base), np.full(base[:, 0].shape, -0.5)  # Keras pads with -0.5
    for i in range(height):
        expected[:, i] = 1 / (1 + np.exp(-(base[:, i] + weight[:, i] * above)))
        above = expected[:, i] - 0.5
    np.testing.assert_allclose(image[..., 0], expected, atol=1e-6)


def test_provider_agreement_checks_rows_given_the_rows_above(artifact):
    """The GPU-versus-CPU measure, run CPU against CPU here: rows agree to float rounding
    (the numpy mirror of the fill against the graph's own), whole images exactly."""
    cpu = ["CPUExecutionProvider"]
    same = provider_agreement(artifact.out / "decoder.onnx", cpu, [{}], count=256)
    assert same["rows given the same rows above, max"] < 1e-6
    assert same["whole images, max"] == 0.0
