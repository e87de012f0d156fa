"""The evaluate stage's figures (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.schema import CLASS_NAMES, METRICS_FILE

GRID = 8


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return path.name


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """(N, 28, 28) -> one (rows*28, columns*28) mosaic, row-major, padded with zeros."""
    count, height, width = images.shape
    rows = -(-count // columns)
    canvas = np.zeros((rows * height, columns * width), dtype=images.dtype)
    for index in range(count):
        r, c = divmod(index, columns)
        canvas[r * height : (r + 1) * height, c * width : (c + 1) * width] = images[index]
    return canvas


def latent_scatter(path: Path, z_mean: np.ndarray, labels: np.ndarray) -> str:
    plt = _pyplot()
    if z_mean.shape[1] > 2:
        from sklearn.decomposition import PCA

        points, title = PCA(n_components=2, random_state=0).fit_transform(z_mean), "test latent means (PCA)"
    else:
        points, title = z_mean, "test latent means"
    fig, ax = plt.subplots(figsize=(7, 6))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=3, alpha=0.7)
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=scatter.cmap(scatter.norm(i)), label=name)
        for i, name in enumerate(CLASS_NAMES)
    ]
    ax.legend(handles=handles, fontsize=7, loc="best", markerscale=1.5)
    ax.set_title(title)
    return _save(fig, path)


def picture(path: Path, canvas: np.ndarray, title: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(canvas.shape[1] / 40, canvas.shape[0] / 40 + 0.4))
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(title)
    ax.axis("off")
    return _save(fig, path)


def training_curves(path: Path, train_dir: Path) -> str | None:
    metrics_path = Path(train_dir) / METRICS_FILE
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    plt = _pyplot()
    epochs = [row["epoch"] + 1 for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(epochs, [row["loss"] for row in rows], label="loss (-ELBO)")
    left.plot(epochs, [row["reconstruction"] for row in rows], label="reconstruction")
    left.set_xlabel("epoch")
    left.set_ylabel("nats per image")
    left.legend()
    right.plot(epochs, [row["kl"] for row in rows], color="tab:green")
    right.set_xlabel("epoch")
    right.set_ylabel("KL, nats per image")
    fig.suptitle("training (train split)")
    return _save(fig, path)


def write_plots(out: Path, model, train_dir: Path, sample: tuple, scores: dict, seed: int) -> list[str]:
    """Write every figure into `out`; returns the file names. `model` is the trained VAE,
    `sample` a few test images (N, 28, 28) uint8 with their posterior means (N, L), and
    `scores` the test split's (for the latent scatter)."""
    generator = model.generator()
    latent = model.config.latent_dim
    rng = np.random.default_rng(seed)
    names = [latent_scatter(out / "latent_scatter.png", scores["z_mean"], scores["label"])]

    samples = np.asarray(generator(rng.standard_normal((GRID * GRID, latent)).astype(np.float32)))[..., 0]
    names.append(picture(out / "prior_samples.png", image_grid(samples, GRID), "samples from the prior"))

    images, z_mean = sample
    originals = images[:GRID] / 255.0
    reconstructed = np.asarray(generator(z_mean[:GRID]))[..., 0]
    pairs = image_grid(np.concatenate([originals, reconstructed]), GRID)
    names.append(picture(out / "reconstructions.png", pairs, "test images (top) and reconstructions (bottom)"))

    if latent == 2:
        from scipy.stats import norm

        steps = 15
        grid = norm.ppf(np.linspace(0.05, 0.95, steps))
        z = np.array([[x, y] for y in grid[::-1] for x in grid], dtype=np.float32)
        manifold = np.asarray(generator(z))[..., 0]
        names.append(picture(out / "latent_manifold.png", image_grid(manifold, steps), "2-D latent manifold"))

    curves = training_curves(out / "training_curves.png", train_dir)
    if curves:
        names.append(curves)
    return names
