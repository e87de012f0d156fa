"""Pixel context: an autoregressive term from the rows above each pixel.

With a context, the decoder predicts per pixel a base logit and one weight per context
offset, and a pixel's Bernoulli logit is

    logit[i, j] = base[i, j] + sum_k weight_k[i, j] * (x[i + di_k, j + dj_k] - 0.5)

over offsets (di_k, dj_k) that all point into earlier rows (di_k < 0); pixels outside the
image count as 0 (background). So p(x | z) = prod_i p(row i | rows < i, z) is still a
normalised likelihood and the ELBO is still a bound. In training and evaluation the rows
above are the true image (one parallel pass); to generate, rows are filled top to bottom
from the probabilities of the rows already filled (`fill_rows`, 28 vectorised steps).
"""

from __future__ import annotations

from keras import ops

from vae import objective
from vae.config import CONTEXTS


def context_offsets(name: str) -> tuple[tuple[int, int], ...]:
    if name not in CONTEXTS:
        raise ValueError(f"context must be one of {sorted(CONTEXTS)}, got {name!r}")
    return CONTEXTS[name]


def shifted(images, di: int, dj: int):
    """out[:, i, j] = images[:, i + di, j + dj], 0 outside; (N, H, W, C) -> same shape."""
    height, width = ops.shape(images)[1], ops.shape(images)[2]
    padded = ops.pad(images, [[0, 0], [max(-di, 0), max(di, 0)], [max(-dj, 0), max(dj, 0)], [0, 0]])
    top, left = max(di, 0), max(dj, 0)
    return padded[:, top : top + height, left : left + width, :]


def context_logits(decoded, images, offsets):
    """Teacher-forced logits (N, H, W, 1) from the decoder's output (N, H, W, 1 + K)
    and the true images (N, H, W, 1) in [0, 1]; without offsets, `decoded` itself.

    One product and one sum over the channels, [base, weights] . [1, context]: slicing
    `decoded` into base and weights instead costs a scatter in the backward pass."""
    if not offsets:
        return decoded
    context = ops.concatenate([shifted(images, di, dj) for di, dj in offsets], axis=-1) - 0.5
    return ops.sum(decoded * ops.concatenate([ops.ones_like(images), context], axis=-1), axis=-1, keepdims=True)


def fill_rows(decoded, offsets, likelihood: str = "bernoulli"):
    """Pixel means (N, H, W, 1) generated row by row: each row's context is the means of
    the rows above (`objective.pixel_mean`: sigmoid for the Bernoulli). Without offsets,
    the mean of `decoded` itself."""
    if not offsets:
        return objective.pixel_mean(decoded, likelihood)
    height, width = decoded.shape[1], decoded.shape[2]
    base, weights = decoded[..., 0], decoded[..., 1:]  # (N, H, W), (N, H, W, K)
    rows: list = []  # centred probabilities (p - 0.5) of the rows filled so far, (N, W)
    for i in range(height):
        logit = base[:, i, :]
        for k, (di, dj) in enumerate(offsets):
            above = rows[i + di] if i + di >= 0 else ops.zeros_like(logit) - 0.5
            if dj:  # out[j] = above[j + dj], background (-0.5 centred) outside
                pad = [[0, 0], [max(-dj, 0), max(dj, 0)]]
                above = ops.pad(above, pad, constant_values=-0.5)[:, max(dj, 0) : max(dj, 0) + width]
            logit = logit + weights[:, i, :, k] * above
        rows.append(objective.pixel_mean(logit, likelihood) - 0.5)
    return ops.stack(rows, axis=1)[..., None] + 0.5
