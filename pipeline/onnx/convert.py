"""A trained VAE's decoder and encoder as ONNX models: tf2onnx's graphs, made friendly to
onnxruntime's CUDA provider (pipeline.onnx.cuda), the decoder's row fill appended by
hand (pipeline.onnx.row_fill)."""

from __future__ import annotations

from pipeline.errors import PipelineError


def convert(function, signature, opset: int, output_names: list[str]):
    """A tf.function -> ONNX ModelProto with named outputs."""
    import tf2onnx

    model, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=opset)
    graph_outputs = [o.name for o in model.graph.output]
    rename = dict(zip(graph_outputs, output_names, strict=True))
    for node in model.graph.node:
        node.output[:] = [rename.get(name, name) for name in node.output]
    for output in model.graph.output:
        output.name = rename[output.name]
    return model


def tf2onnx_graphs(model, opset: int):
    """What tf2onnx writes for the decoder network (z -> `decoded`, the fill's input) and
    the encoder (image -> z_mean, z_log_var), before any rewrite."""
    import tensorflow as tf

    from pipeline.onnx.row_fill import DECODED

    decoder, encoder = model.decoder, model.encoder

    @tf.function
    def decode(z):
        return decoder(z, training=False)

    @tf.function
    def encode(image):
        z_mean, z_log_var = encoder(image, training=False)
        return z_mean, z_log_var

    latent = tf.TensorSpec([None, model.config.latent_dim], tf.float32, name="z")
    image = tf.TensorSpec([None, *model.config.image_shape], tf.float32, name="image")
    return convert(decode, [latent], opset, [DECODED]), convert(encode, [image], opset, ["z_mean", "z_log_var"])


def onnx_models(model, opset: int, decoder_reference):
    """The decoder and encoder ONNX models of a trained VAE, each with its Keras reference
    (`reference(inputs, onnx_outputs)`; the decoder's is given: see pipeline.onnx.parity)."""
    from pipeline.onnx.cuda import cuda_refusals, make_cuda_friendly
    from pipeline.onnx.row_fill import append_row_fill
    from vae.config import CONTEXTS

    decoder_onnx, encoder_onnx = tf2onnx_graphs(model, opset)
    # The row fill is appended by hand: tf2onnx spent ~260 nodes on it (see pipeline.onnx.row_fill).
    height, width, _ = model.config.image_shape
    append_row_fill(
        make_cuda_friendly(decoder_onnx), CONTEXTS[model.config.context], height, width, model.config.likelihood
    )
    make_cuda_friendly(encoder_onnx)
    for name, proto in (("decoder", decoder_onnx), ("encoder", encoder_onnx)):
        refusals = cuda_refusals(proto)
        if refusals:
            raise PipelineError(
                f"{name}: {len(refusals)} node(s) would leave onnxruntime's CUDA provider: {refusals[0]}"
            )
    return {
        "decoder": (decoder_onnx, decoder_reference),
        "encoder": (encoder_onnx, lambda images, _: model.encoder(images, training=False)),
    }
