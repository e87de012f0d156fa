"""Pure evaluation metrics on numpy arrays (no TensorFlow, no Ray, no files).

Log-likelihood quantities are in nats per image unless the name says bits per dim.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vae.continuous_bernoulli import cb_log_norm, cb_logits_for_means

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al.: Cov_x(E_q[z_d]) above this is "active"


def bits_per_dim(nats_per_image: float, dims: int) -> float:
    return float(nats_per_image) / (dims * math.log(2.0))


def per_dimension_kl(z_mean: np.ndarray, z_log_var: np.ndarray) -> np.ndarray:
    """Mean over examples of KL(q(z_d|x) || N(0, 1)) per latent dimension; (N, L) -> (L,)."""
    kl = 0.5 * (np.square(z_mean) + np.exp(z_log_var) - 1.0 - z_log_var)
    return kl.mean(axis=0)


def active_units(z_mean: np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD) -> tuple[int, np.ndarray]:
    """Latent dimensions whose posterior mean varies across the data (variance > threshold)."""
    variance = z_mean.var(axis=0)
    return int((variance > threshold).sum()), variance


def _xlogx(p: np.ndarray) -> np.ndarray:
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


def pixel_entropy(images: np.ndarray) -> np.ndarray:
    """Summed pixel entropy of each image in [0, 1], (N, ...) -> (N,): the best
    -log p(x|z) any Bernoulli decoder can reach on it (the reconstruction floor)."""
    x = images.reshape(len(images), -1).astype(np.float64)
    return -(_xlogx(x) + _xlogx(1.0 - x)).sum(axis=1)


def mean_image_baseline(train_mean: np.ndarray, test_mean: np.ndarray, likelihood: str = "bernoulli") -> float:
    """Mean -log p(x) on test under independent pixels whose means are the training mean
    image (Bernoulli, or continuous Bernoulli: its logit found by bisection).

    Takes the two splits' mean images (pixels in [0, 1]): the log-likelihood is linear in
    x, so its mean over the test images is the log-likelihood of their mean image.
    """
    p = np.clip(np.asarray(train_mean, np.float64).reshape(-1), 1e-6, 1 - 1e-6)
    x = np.asarray(test_mean, np.float64).reshape(-1)
    if likelihood == "bernoulli":
        return float(-(x * np.log(p) + (1.0 - x) * np.log1p(-p)).sum())
    logits = cb_logits_for_means(p)
    log_p = -np.logaddexp(0.0, -logits)  # log sigmoid(l)
    log_q = -np.logaddexp(0.0, logits)  # log sigmoid(-l)
    return float(-(x * log_p + (1.0 - x) * log_q + cb_log_norm(logits)).sum())


def clustering_scores(
    test_latents: np.ndarray,
    test_labels: np.ndarray,
    train_latents: np.ndarray,
    train_labels: np.ndarray,
    clusters: int = 10,
    knn_k: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """k-means NMI/ARI, silhouette with the true labels, and k-NN accuracy on the latents."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
    from sklearn.neighbors import KNeighborsClassifier

    assignments = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit_predict(test_latents)
    knn = KNeighborsClassifier(n_neighbors=knn_k).fit(train_latents, train_labels)
    sample = min(len(test_latents), 5000)
    return {
        "kmeans_k": clusters,
        "kmeans_nmi": float(normalized_mutual_info_score(test_labels, assignments)),
        "kmeans_ari": float(adjusted_rand_score(test_labels, assignments)),
        "silhouette_true_labels": float(
            silhouette_score(test_latents, test_labels, sample_size=sample, random_state=seed)
        ),
        "knn_k": knn_k,
        "knn_accuracy": float(knn.score(test_latents, test_labels)),
    }


def posterior_health(z_mean, z_log_var, reconstruction: float, mean_image_nats: float) -> dict[str, Any]:
    """Active units, per-dimension KL and a posterior-collapse flag with its reasons."""
    count, variance = active_units(z_mean)
    reasons = []
    if count == 0:
        reasons.append("no active latent units")
    if reconstruction >= mean_image_nats:
        reasons.append("reconstruction no better than the mean image")
    return {
        "active_units": count,
        "latent_dim": int(z_mean.shape[1]),
        "active_unit_threshold": ACTIVE_UNIT_THRESHOLD,
        "posterior_mean_variance": variance.tolist(),
        "kl_per_dimension": per_dimension_kl(z_mean, z_log_var).tolist(),
        "posterior_collapse": bool(reasons),
        "collapse_reasons": reasons,
    }
