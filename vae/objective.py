"""The VAE objective as small pure functions (Keras ops; numpy or tensors in).

All log-likelihoods and bounds are in nats per example, summed over pixels and
latent dimensions; nothing here averages over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from keras import ops

LOG_2PI = math.log(2.0 * math.pi)


def reparameterize(z_mean, z_log_var, eps):
    """z = mean + exp(log_var / 2) * eps: a differentiable draw from q(z | x); (N, L)."""
    return z_mean + ops.exp(0.5 * z_log_var) * eps


def bernoulli_log_likelihood(images, logits):
    """log p(x | z) for pixels x in [0, 1] under Bernoulli(sigmoid(logits)).

    Computed stably as -(max(l, 0) - x*l + log1p(exp(-|l|))), so pixels of exactly
    0 or 1 and logits of any size stay finite. Shapes (N, H, W, C) -> (N,).
    """
    per_pixel = -(ops.relu(logits) - images * logits + ops.log1p(ops.exp(-ops.abs(logits))))
    return ops.sum(ops.reshape(per_pixel, (ops.shape(per_pixel)[0], -1)), axis=-1)


def continuous_bernoulli_log_norm(logits):
    """log C(l), the continuous Bernoulli's log normalising constant (Loaiza-Ganem and
    Cunningham, NeurIPS 2019) for a pixel with logit l: with lambda = sigmoid(l),
    C = 2 artanh(1 - 2 lambda) / (1 - 2 lambda), which is l / tanh(l / 2), 2 at l = 0.

    Computed as log|l| - log(-expm1(-|l|)) + log1p(exp(-|l|)), stable for logits of any
    size; within 1e-3 of 0 the series log 2 + l^2 / 12 is used (its next term is
    l^4 / 1440 below it).
    """
    magnitude = ops.abs(logits)
    safe = ops.maximum(magnitude, 1e-3)
    exact = ops.log(safe) - ops.log(-ops.expm1(-safe)) + ops.log1p(ops.exp(-safe))
    series = math.log(2.0) + ops.square(logits) / 12.0
    return ops.where(magnitude < 1e-3, series, exact)


def continuous_bernoulli_log_likelihood(images, logits):
    """log p(x | z) for pixels x in [0, 1] under the continuous Bernoulli with parameter
    sigmoid(logits): the Bernoulli term plus each pixel's log C, so that the density
    integrates to 1 over [0, 1] and the bound is on a proper density over [0, 1]^784.
    Shapes (N, H, W, C) -> (N,)."""
    per_pixel = continuous_bernoulli_log_norm(logits)
    log_norm = ops.sum(ops.reshape(per_pixel, (ops.shape(per_pixel)[0], -1)), axis=-1)
    return bernoulli_log_likelihood(images, logits) + log_norm


LIKELIHOODS = {
    "bernoulli": bernoulli_log_likelihood,
    "continuous_bernoulli": continuous_bernoulli_log_likelihood,
}
# |logit| under which the continuous Bernoulli mean uses its series: above it the exact
# form's cancellation costs at most ~1e-6 in float32; below it the series' error is < 1e-8.
CB_SERIES_BELOW = 0.5


def log_likelihood(images, logits, likelihood: str = "bernoulli"):
    """log p(x | z) per example, (N, H, W, C) -> (N,), under the named pixel likelihood."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {sorted(LIKELIHOODS)}, got {likelihood!r}")
    return LIKELIHOODS[likelihood](images, logits)


def pixel_mean(logits, likelihood: str = "bernoulli"):
    """Each pixel's expected value in [0, 1]: what the decoder outputs as the image and
    what generation feeds the pixel context. Bernoulli: sigmoid(l). Continuous Bernoulli:
    1 / (1 - exp(-l)) - 1 / l, which is 1/2 at l = 0; below |l| = CB_SERIES_BELOW the
    series 1/2 + l/12 - l^3/720 + l^5/30240 (error under l^7 / 1209600). The ONNX export
    writes the same formula, operation for operation (pipeline.onnx.row_fill)."""
    if likelihood == "bernoulli":
        return ops.sigmoid(logits)
    if likelihood != "continuous_bernoulli":
        raise ValueError(f"likelihood must be one of {sorted(LIKELIHOODS)}, got {likelihood!r}")
    small = ops.abs(logits) < CB_SERIES_BELOW
    safe = ops.where(small, CB_SERIES_BELOW, logits)
    exact = 1.0 / (1.0 - ops.exp(-safe)) - 1.0 / safe
    square = ops.square(logits)
    series = 0.5 + logits * (1.0 / 12.0 + square * (-1.0 / 720.0 + square * (1.0 / 30240.0)))
    return ops.where(small, series, exact)


def kl_per_dimension(z_mean, z_log_var):
    """Analytic KL(N(mean, exp(log_var)) || N(0, 1)) of each latent dimension; (N, L)."""
    return -0.5 * (1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))


def kl_divergence(z_mean, z_log_var):
    """Analytic KL(N(mean, exp(log_var)) || N(0, I)); shapes (N, L) -> (N,)."""
    return ops.sum(kl_per_dimension(z_mean, z_log_var), axis=-1)


def free_bits_kl(z_mean, z_log_var, free_bits: float):
    """A training-only KL term (Kingma et al. 2016, "free bits"): each latent dimension's
    KL, averaged over the batch, counts as at least `free_bits` nats; a scalar, nats per
    example. Below that a dimension gets no gradient towards the prior, so a decoder with
    a pixel context cannot switch the latent off. Equals the mean KL when every dimension
    is above `free_bits`; the ELBO itself is always reported with the true KL.
    """
    per_dimension = ops.mean(kl_per_dimension(z_mean, z_log_var), axis=0)
    return ops.sum(ops.maximum(per_dimension, free_bits))


def info_nce(a, b, temperature: float):
    """The symmetric InfoNCE loss (SimCLR's NT-Xent over two views) between rows of `a`
    and `b`, (N, L) each: row i of `a` and row i of `b` are two views of one image, every
    other row of the other view a negative; cosine similarity over `temperature`. Returns
    (N,), nats per example: log N when the rows cannot be told apart, near 0 when each
    row's partner is by far its closest."""

    def unit(rows):
        return rows * ops.rsqrt(ops.maximum(ops.sum(ops.square(rows), axis=-1, keepdims=True), 1e-12))

    similarity = ops.matmul(unit(a), ops.transpose(unit(b))) / temperature
    positive = ops.diagonal(similarity)
    rows = ops.logsumexp(similarity, axis=1) - positive
    columns = ops.logsumexp(similarity, axis=0) - positive
    return 0.5 * (rows + columns)


def neg_elbo(images, logits, z_mean, z_log_var, beta: float = 1.0, likelihood: str = "bernoulli"):
    """Per-example loss -E_q[log p(x|z)] + beta * KL, one-sample estimate; returns
    (loss, reconstruction, kl), each (N,), where reconstruction = -log p(x|z).

    With beta = 1 the loss is the negative ELBO in nats.
    """
    reconstruction = -log_likelihood(images, logits, likelihood)
    kl = kl_divergence(z_mean, z_log_var)
    return reconstruction + beta * kl, reconstruction, kl


def training_objective(
    images,
    logits,
    z_mean,
    z_log_var,
    global_batch: int,
    *,
    beta: float = 1.0,
    likelihood: str = "bernoulli",
    free_bits=None,
    view_mean=None,
    contrastive_weight: float = 0.0,
    temperature: float = 1.0,
):
    """What training minimises for one batch, and the true ELBO's terms for its metrics.

    The objective is the batch's summed negative ELBO divided by `global_batch` (the
    examples the whole data-parallel step averages over), with two training-only changes:
    with `free_bits` (nats per latent dimension; a number or a scalar tensor), the KL
    term is `free_bits_kl`'s floored KL; with `view_mean` (N, L), the latent means of a
    second view of each image (vae.augment), `contrastive_weight` times the summed
    `info_nce` between them and `z_mean` is added. Shapes: images (N, H, W, 1), logits
    like images, z_mean and z_log_var (N, L). Returns (objective, (loss, reconstruction,
    kl)): a scalar, then (N,) each in nats, the reported ELBO without either change.
    """
    loss, reconstruction, kl = neg_elbo(images, logits, z_mean, z_log_var, beta=beta, likelihood=likelihood)
    if free_bits is not None:
        kl_term = ops.shape(z_mean)[0] * free_bits_kl(z_mean, z_log_var, free_bits)
        objective = (ops.sum(reconstruction) + beta * kl_term) / global_batch
    else:
        objective = ops.sum(loss) / global_batch
    if view_mean is not None and contrastive_weight > 0:
        nce = info_nce(ops.cast(z_mean, "float32"), ops.cast(view_mean, "float32"), temperature)
        objective += contrastive_weight * ops.sum(nce) / global_batch
    return objective, (loss, reconstruction, kl)


def gaussian_log_density(z, mean, log_var):
    """log N(z; mean, exp(log_var)) summed over the last axis; (..., L) -> (...)."""
    return -0.5 * ops.sum(LOG_2PI + log_var + ops.square(z - mean) * ops.exp(-log_var), axis=-1)


def iwae_bound(
    images,
    z_mean,
    z_log_var,
    decode_logits: Callable,
    k: int,
    seed=None,
    eps=None,
    likelihood: str = "bernoulli",
):
    """The importance-weighted lower bound on log p(x) with `k` samples (nats, (N,)).

    log p(x) >= E[log (1/k) sum_j p(x, z_j) / q(z_j | x)], z_j ~ q(z | x), estimated
    with one draw of k samples per image, combined with log-sum-exp. With k = 1 it
    is the one-sample ELBO estimate. `decode_logits` maps (M, L) latents to
    (M, H, W, C) logits; it is called once on all N*k samples. `eps` (k, N, L), if
    given, is the standard normal noise to use instead of drawing it with `seed`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    from keras import random

    n = ops.shape(z_mean)[0]
    latent = ops.shape(z_mean)[1]
    if eps is None:
        eps = random.normal((k, n, latent), seed=seed, dtype=z_mean.dtype)
    z = reparameterize(z_mean[None], z_log_var[None], eps)  # (k, N, L)
    z_flat = ops.reshape(z, (k * n, latent))
    logits = decode_logits(z_flat)  # (k*N, H, W, C)
    tiled = ops.tile(images, (k, 1, 1, 1))
    log_px_z = ops.reshape(log_likelihood(tiled, logits, likelihood), (k, n))
    log_pz = gaussian_log_density(z, ops.zeros_like(z), ops.zeros_like(z))
    log_qz = gaussian_log_density(z, z_mean[None], z_log_var[None])
    log_w = log_px_z + log_pz - log_qz  # (k, N)
    return ops.logsumexp(log_w, axis=0) - math.log(k)
