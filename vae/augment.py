"""Another view of each image, for the training-only contrastive term (see
`vae.objective.info_nce`): the same garment moved, mirrored, zoomed and dimmed.

Pure Keras ops; the random draws come in as arguments, so the caller decides the seeds.
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
