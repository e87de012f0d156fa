"""Another view of each image, for the training-only contrastive term (see
`vae.objective.info_nce`): the same garment moved, mirrored, zoomed and dimmed.

`augment` is pure Keras ops, its random draws given as arguments; `random_view` draws
them, statelessly, from a seed (TensorFlow's stateless random ops), as training does.
"""

from __future__ import annotations

from keras import ops

# The ranges the training loop draws from (uniformly; a shift is a whole number of pixels).
MAX_SHIFT = 2  # pixels, each axis
ZOOM = (0.85, 1.2)  # >1 shrinks the garment (each output pixel reads further out)
GAIN = (0.6, 1.0)  # ink intensity


def augment(images, shift_x, shift_y, mirror, zoom, gain):
    """Images (N, H, W, 1) in [0, 1] -> the transformed copy, (N, H, W, 1).

    Per image (each argument (N,)): mirrored left-right where `mirror` is 1, scaled by
    `zoom` about the centre, moved by (`shift_x`, `shift_y`) pixels, bilinear, the
    background filled with 0, then multiplied by `gain`.
    """
    width = ops.cast(ops.shape(images)[2], "float32")
    height = ops.cast(ops.shape(images)[1], "float32")
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    sign = 1.0 - 2.0 * mirror
    zero = ops.zeros_like(zoom)
    # Output pixel (x, y) reads input (sign*zoom*(x - cx) + cx - shift_x, zoom*(y - cy) + cy - shift_y).
    transform = ops.stack(
        [sign * zoom, zero, cx - sign * zoom * cx - shift_x, zero, zoom, cy - zoom * cy - shift_y, zero, zero],
        axis=1,
    )
    moved = ops.image.affine_transform(
        images, transform, interpolation="bilinear", fill_mode="constant", fill_value=0.0, data_format="channels_last"
    )
    return moved * ops.reshape(gain, (-1, 1, 1, 1))


def random_view(images, seed):
    """Another view of each image of `images` (N, H, W, 1) for the contrastive term, its
    transform drawn statelessly from `seed` (a (2,) int32 tensor): shifts in
    [-MAX_SHIFT, MAX_SHIFT] pixels, a mirror with probability 1/2, a zoom in ZOOM and a
    gain in GAIN, each image its own. The same seed gives the same view."""
    import tensorflow as tf

    n = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed + [7, 11], 5)

    def shift(s):
        return tf.cast(tf.random.stateless_uniform((n,), s, -MAX_SHIFT, MAX_SHIFT + 1, tf.int32), tf.float32)

    mirror = tf.cast(tf.random.stateless_uniform((n,), seeds[2]) < 0.5, tf.float32)
    zoom = tf.random.stateless_uniform((n,), seeds[3], *ZOOM)
    gain = tf.random.stateless_uniform((n,), seeds[4], *GAIN)
    # The shifts' sign is arbitrary (a symmetric draw); negated, they are the draws the
    # measured runs of docs/benchmarks.md used.
    return augment(images, -shift(seeds[0]), -shift(seeds[1]), mirror, zoom, gain)
