"""Evaluate stage: test-set bounds, posterior health and latent clustering, with a report.

Per-example values are computed in batches by a model-holding actor through Ray Data
(`map_batches`), so the same code scores a dataset larger than one machine.

Output contract (EVAL_DIR): report.json (every number), report.html (self-contained,
plots inlined), the plots as PNG files, and config.json. EVAL_DIR must be new, empty
or an earlier evaluate output (see pipeline.outputs).
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.atomic import atomic_directory, write_json, write_text
from pipeline.config import Config
from pipeline.dataset import check_dataset, read_split, with_dataset_section
from pipeline.errors import PipelineError, find_user_error
from pipeline.metrics import (
    bits_per_dim,
    clustering_scores,
    mean_image_baseline,
    posterior_health,
    reconstruction_floor,
)
from pipeline.model_store import check_model_dir
from pipeline.outputs import check_output
from pipeline.schema import (
    COLUMN_ID,
    COLUMN_IMAGE,
    COLUMN_LABEL,
    CONFIG_FILE,
    PIXELS,
    REPORT_HTML,
    REPORT_JSON,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    out: Path
    report: dict[str, Any]


def example_noise(ids: np.ndarray, seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise of `shape` per example, fixed by (seed, example id).

    The same example gets the same draws whatever batch it lands in. (N,) -> (N, *shape).
    """
    return np.stack([np.random.default_rng([seed, int(i)]).standard_normal(shape) for i in ids]).astype(
        np.float32
    )


class ExampleScorer:
    """A Ray Data actor holding the model: scores a batch of test examples.

    Output columns: id, label, loss, reconstruction, kl (one-sample negative ELBO and its
    parts, nats), iwae (log p(x) lower bound with `iwae_k` samples, nats), z_mean, z_log_var.
    """

    def __init__(self, train_dir: str, iwae_k: int, seed: int):
        from pipeline.model_store import load_model

        self.model, _ = load_model(Path(train_dir))
        self.iwae_k, self.seed = iwae_k, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return score_batch(self.model, batch, self.iwae_k, self.seed)


def score_batch(model, batch: dict[str, np.ndarray], iwae_k: int, seed: int) -> dict[str, np.ndarray]:
    """Per-example bounds for one batch (the ExampleScorer's work, callable in tests)."""
    from keras import ops

    from vae import iwae_bound, neg_elbo, reparameterize

    ids = np.asarray(batch[COLUMN_ID])
    images = np.asarray(batch[COLUMN_IMAGE], dtype=np.float32)[..., None] / 255.0  # (N, 28, 28, 1)
    latent = model.config.latent_dim
    z_mean, z_log_var = (np.asarray(t) for t in model.encoder(images))
    eps = example_noise(ids, seed, (latent,))
    logits = model.logits(reparameterize(z_mean, z_log_var, eps), images)
    loss, reconstruction, kl = (np.asarray(t) for t in neg_elbo(images, logits, z_mean, z_log_var))
    # IWAE noise per example: (N, K, L) -> (K, N, L) as iwae_bound draws it.
    iwae_eps = np.transpose(example_noise(ids, seed + 1, (iwae_k, latent)), (1, 0, 2))

    def decode(z):  # (K*N, L), K-major: each image repeated K times as the pixel context
        return model.logits(z, ops.tile(images, (iwae_k, 1, 1, 1)))

    bound = iwae_bound(images, z_mean, z_log_var, decode, k=iwae_k, eps=ops.convert_to_tensor(iwae_eps))
    return {
        COLUMN_ID: ids,
        COLUMN_LABEL: np.asarray(batch[COLUMN_LABEL]),
        "loss": loss,
        "reconstruction": reconstruction,
        "kl": kl,
        "iwae": np.asarray(bound),
        "z_mean": z_mean,
        "z_log_var": z_log_var,
    }


class LatentEncoder:
    """A Ray Data actor returning posterior means (for the k-NN fit on the train split)."""

    def __init__(self, train_dir: str):
        from pipeline.model_store import load_model

        self.model, _ = load_model(Path(train_dir))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.asarray(batch[COLUMN_IMAGE], dtype=np.float32)[..., None] / 255.0
        z_mean, _ = self.model.encoder(images)
        return {COLUMN_LABEL: np.asarray(batch[COLUMN_LABEL]), "z_mean": np.asarray(z_mean)}


def collect(dataset) -> dict[str, np.ndarray]:
    """Gather a (small) scored dataset into numpy arrays, ordered by id when present."""
    parts = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    data = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    if COLUMN_ID in data:
        order = np.argsort(data[COLUMN_ID], kind="stable")
        data = {key: value[order] for key, value in data.items()}
    return data


def collect_carrying_user_errors(*datasets) -> list[dict[str, np.ndarray]]:
    """`collect` each dataset; a user error raised in a Ray Data task or actor comes
    back as that PipelineError, not as Ray's multi-line wrapper."""
    try:
        return [collect(dataset) for dataset in datasets]
    except Exception as exc:
        user = find_user_error(exc)
        if user is None:
            raise
        raise PipelineError(str(user)) from exc


def check_inputs(data_dir: Path, train_dir: Path) -> tuple[dict, dict]:
    """The dataset (content hash included) and the model files, checked before Ray starts."""
    manifest = check_dataset(data_dir, full=True)
    info = check_model_dir(train_dir)
    model_shape = tuple(info["architecture"]["image_shape"])
    data_shape = (*manifest["image_shape"], 1)
    if model_shape != data_shape:
        raise PipelineError(f"model expects images of shape {model_shape}, the dataset holds {data_shape}")
    if info.get("data_sha256") != manifest["content_sha256"]:
        log.warning("evaluate: the model was trained on other data (sha256 %s)", str(info.get("data_sha256"))[:12])
    return manifest, info


def evaluate(config: Config, data_dir: Path, train_dir: Path, out: Path, verbose: bool = False) -> EvaluateResult:
    """Run the evaluate stage and write EVAL_DIR atomically."""
    data_dir, train_dir, out = Path(data_dir), Path(train_dir), Path(out)
    manifest, info = check_inputs(data_dir, train_dir)
    config = with_dataset_section(config, manifest, data_dir)
    check_output(out, "evaluate")
    from pipeline import ray_cluster

    ray_cluster.connect(config.train.address, min_cpus=2, verbose=verbose)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = verbose
    started = time.time()
    ev = config.evaluate
    actors = max(1, min(2, int(ray.cluster_resources().get("CPU", 1)) - 1))
    test = ray.data.read_parquet(str(data_dir.resolve() / "test"))
    scored = test.map_batches(
        ExampleScorer,
        fn_constructor_kwargs={"train_dir": str(train_dir.resolve()), "iwae_k": ev.iwae_k, "seed": config.seed},
        batch_size=ev.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
    )
    log.info("evaluate: scoring the test split (IWAE k=%d) on %d actors", ev.iwae_k, actors)
    train_latents = ray.data.read_parquet(str(data_dir.resolve() / "train"), columns=[COLUMN_IMAGE, COLUMN_LABEL])
    train_latents = train_latents.map_batches(
        LatentEncoder,
        fn_constructor_kwargs={"train_dir": str(train_dir.resolve())},
        batch_size=2000,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
    )
    test_scores, train_latents = collect_carrying_user_errors(scored, train_latents)
    scoring_seconds = time.time() - started
    report = build_report(config, manifest, info, data_dir, test_scores, train_latents, scoring_seconds)
    with atomic_directory(out, "evaluate") as tmp:
        from pipeline.plots import write_plots
        from pipeline.report_html import render_html

        test_images, _ = read_split(data_dir, "test")
        plots = write_plots(tmp, train_dir, test_images, test_scores, config.seed)
        report["plots"] = sorted(plots)
        write_json(tmp / REPORT_JSON, report)
        write_text(tmp / REPORT_HTML, render_html(report, tmp))
        write_json(tmp / CONFIG_FILE, config.to_dict())
    log.info("evaluate: test -ELBO %.2f nats (IWAE bound %.2f) in %.0f s", report["test"]["neg_elbo"],
             report["test"]["neg_iwae"], time.time() - started)
    return EvaluateResult(out, report)


def build_report(config, manifest, info, data_dir, scores, train_latents, seconds) -> dict[str, Any]:
    import ray
    import sklearn

    check_finite(scores)
    train_images, _ = read_split(data_dir, "train")
    test_images, _ = read_split(data_dir, "test")
    train_x, test_x = train_images / 255.0, test_images / 255.0
    neg_elbo = float(scores["loss"].mean())
    neg_iwae = float(-scores["iwae"].mean())
    reconstruction = float(scores["reconstruction"].mean())
    mean_image = mean_image_baseline(train_x, test_x)
    test = {
        "examples": int(len(scores["loss"])),
        "neg_elbo": neg_elbo,
        "reconstruction": reconstruction,
        "kl": float(scores["kl"].mean()),
        "neg_elbo_bits_per_dim": bits_per_dim(neg_elbo, PIXELS),
        "neg_iwae": neg_iwae,
        "neg_iwae_bits_per_dim": bits_per_dim(neg_iwae, PIXELS),
        "iwae_k": config.evaluate.iwae_k,
        "neg_elbo_std": float(scores["loss"].std()),
    }
    return {
        "format": "vae-pipeline/report/v1",
        "units": "nats per image unless named bits_per_dim",
        "test": test,
        "context": {
            "reconstruction_floor": reconstruction_floor(test_x),
            "mean_image_baseline": mean_image,
            "note": "floor: summed pixel entropy, the best any Bernoulli decoder can reach; "
            "baseline: independent Bernoullis at the training mean image",
        },
        "posterior": posterior_health(scores["z_mean"], scores["z_log_var"], reconstruction, mean_image),
        "clustering": clustering_scores(
            scores["z_mean"],
            scores[COLUMN_LABEL],
            train_latents["z_mean"],
            train_latents[COLUMN_LABEL],
            clusters=config.evaluate.clusters,
            knn_k=config.evaluate.knn_k,
            seed=config.seed,
        ),
        "model": {
            "architecture": info["architecture"],
            "epochs": info.get("epochs"),
            "data_sha256": info.get("data_sha256"),
        },
        "data": {"content_sha256": manifest["content_sha256"], "rows": manifest["rows"]},
        "scoring_seconds": seconds,
        "versions": {
            "pipeline": __version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
            "ray": ray.__version__,
        },
    }


def check_finite(scores: dict[str, np.ndarray]) -> None:
    for key in ("loss", "reconstruction", "kl", "iwae"):
        bad = int((~np.isfinite(scores[key])).sum())
        if bad:
            raise PipelineError(f"evaluate: {bad} test examples give a non-finite {key} (diverged model?)")


def read_report(eval_dir: Path) -> dict[str, Any]:
    from pipeline.model_store import read_json

    path = Path(eval_dir) / REPORT_JSON
    if not path.is_file():
        raise PipelineError(f"{eval_dir}: no {REPORT_JSON} (run evaluate first)")
    return read_json(path)
