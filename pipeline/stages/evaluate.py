"""Evaluate stage: test-set bounds, posterior health and latent clustering, with a report.

Each split is read once, into Ray's object store. Per-example values are computed in
batches by model-holding actors through Ray Data (`map_batches`), and whole-split
statistics (the mean images) as per-batch sums, so the driver never holds a split of
images and the same code scores a dataset larger than one machine. The driver keeps
per-example scores and latents, and loads the model once, for the plots.

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
from pipeline.config import Config
from pipeline.data.dataset import check_dataset, with_dataset_section
from pipeline.errors import PipelineError, find_user_error
from pipeline.files import write_json, write_text
from pipeline.outputs import check_output, stage_output
from pipeline.report.metrics import (
    bits_per_dim,
    clustering_scores,
    mean_image_baseline,
    pixel_entropy,
    posterior_health,
)
from pipeline.report.plots import GRID, write_plots
from pipeline.schema import (
    COLUMN_ID,
    COLUMN_IMAGE,
    COLUMN_LABEL,
    CONFIG_FILE,
    PIXELS,
    REPORT_HTML,
    REPORT_JSON,
)
from pipeline.stages import StageRun
from pipeline.storage import join
from pipeline.training.model_store import (
    check_model_dir,
    load_model,
    load_model_from_files,
    model_files,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    out: Path
    report: dict[str, Any]


@dataclass(frozen=True)
class SplitResults:
    """What the driver keeps of one pass over each split."""

    test_scores: dict[str, np.ndarray]  # per test example, ordered by id (see score_batch)
    train_latents: dict[str, np.ndarray]  # label and z_mean per training example
    train_mean: np.ndarray  # (784,) mean training image, pixels in [0, 1]
    test_mean: np.ndarray  # (784,) mean test image
    test_sample: dict[str, np.ndarray]  # id and image (uint8) of a few test examples, for the plots


def example_noise(ids: np.ndarray, seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise of `shape` per example, fixed by (seed, example id).

    The same example gets the same draws whatever batch it lands in. (N,) -> (N, *shape).
    """
    return np.stack([np.random.default_rng([seed, int(i)]).standard_normal(shape) for i in ids]).astype(np.float32)


class ExampleScorer:
    """A Ray Data actor holding the model: scores a batch of test examples.

    Output columns: id, label, loss, reconstruction, kl (one-sample negative ELBO and its
    parts, nats), iwae (log p(x) lower bound with `iwae_k` samples, nats), z_mean,
    z_log_var, pixel_entropy (the image's reconstruction floor, nats).
    """

    def __init__(self, model: dict[str, bytes], iwae_k: int, seed: int):
        self.model, _ = load_model_from_files(model)
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
    likelihood = model.config.likelihood
    loss, reconstruction, kl = (
        np.asarray(t) for t in neg_elbo(images, logits, z_mean, z_log_var, likelihood=likelihood)
    )
    # IWAE noise per example: (N, K, L) -> (K, N, L) as iwae_bound draws it.
    iwae_eps = np.transpose(example_noise(ids, seed + 1, (iwae_k, latent)), (1, 0, 2))

    def decode(z):  # (K*N, L), K-major: each image repeated K times as the pixel context
        return model.logits(z, ops.tile(images, (iwae_k, 1, 1, 1)))

    bound = iwae_bound(
        images, z_mean, z_log_var, decode, k=iwae_k, eps=ops.convert_to_tensor(iwae_eps), likelihood=likelihood
    )
    return {
        COLUMN_ID: ids,
        COLUMN_LABEL: np.asarray(batch[COLUMN_LABEL]),
        "loss": loss,
        "reconstruction": reconstruction,
        "kl": kl,
        "iwae": np.asarray(bound),
        "z_mean": z_mean,
        "z_log_var": z_log_var,
        "pixel_entropy": pixel_entropy(images),
    }


class LatentEncoder:
    """A Ray Data actor returning posterior means (for the k-NN fit on the train split)."""

    def __init__(self, model: dict[str, bytes]):
        self.model, _ = load_model_from_files(model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.asarray(batch[COLUMN_IMAGE], dtype=np.float32)[..., None] / 255.0
        z_mean, _ = self.model.encoder(images)
        return {COLUMN_LABEL: np.asarray(batch[COLUMN_LABEL]), "z_mean": np.asarray(z_mean)}


def pixel_sums(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row per batch: its image count and per-pixel sum (pixels in [0, 1])."""
    images = np.asarray(batch[COLUMN_IMAGE]).reshape(len(batch[COLUMN_IMAGE]), -1)
    return {"count": np.array([len(images)]), "pixel_sum": images.sum(axis=0, dtype=np.float64)[None] / 255.0}


def mean_image(sums: dict[str, np.ndarray]) -> np.ndarray:
    return sums["pixel_sum"].sum(axis=0) / sums["count"].sum()


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


def evaluate(
    config: Config, data_dir: Path, train_dir: Path, out: Path, verbose: bool = False, parquet: str | None = None
) -> EvaluateResult:
    """Run the evaluate stage and write EVAL_DIR atomically."""
    data_dir, train_dir, out = Path(data_dir), Path(train_dir), Path(out)
    manifest, info = check_inputs(data_dir, train_dir)
    config = with_dataset_section(config, manifest, data_dir)
    check_output(out, "evaluate")
    from pipeline.cluster import connection as ray_cluster

    ray_cluster.connect(config.ray.address, min_cpus=2, verbose=verbose)
    started = time.time()
    splits = score_splits(config, parquet or str(data_dir.resolve()), train_dir, verbose)
    report = build_report(config, manifest, info, splits, time.time() - started)
    model, _ = load_model(train_dir)
    with stage_output(out, "evaluate") as tmp:
        from pipeline.report.html import render_html

        sample_rows = np.searchsorted(splits.test_scores[COLUMN_ID], splits.test_sample[COLUMN_ID])
        sample = (splits.test_sample[COLUMN_IMAGE], splits.test_scores["z_mean"][sample_rows])
        plots = write_plots(tmp, model, train_dir, sample, splits.test_scores, config.seed)
        report["plots"] = sorted(plots)
        write_json(tmp / REPORT_JSON, report)
        write_text(tmp / REPORT_HTML, render_html(report, tmp))
        write_json(tmp / CONFIG_FILE, config.to_dict())
    log.info(
        "evaluate: test -ELBO %.2f nats (IWAE bound %.2f) in %.0f s",
        report["test"]["neg_elbo"],
        report["test"]["neg_iwae"],
        time.time() - started,
    )
    return EvaluateResult(out, report)


def score_splits(config: Config, parquet: str, train_dir: Path, verbose: bool) -> SplitResults:
    """One read of each split into the object store, then Ray Data passes over it: test
    scores, training latents, and both mean images. `parquet` is the dataset directory
    or URI, and the actors get the model's bytes: no node needs this one's disk."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = verbose
    ev = config.evaluate
    actors = max(1, min(2, int(ray.cluster_resources().get("CPU", 1)) - 1))
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=actors)
    model = model_files(train_dir)
    test = ray.data.read_parquet(join(parquet, "test")).materialize()
    train = ray.data.read_parquet(join(parquet, "train"), columns=[COLUMN_IMAGE, COLUMN_LABEL]).materialize()
    scored = test.map_batches(
        ExampleScorer,
        fn_constructor_kwargs={"model": model, "iwae_k": ev.iwae_k, "seed": config.seed},
        batch_size=ev.batch_size,
        batch_format="numpy",
        compute=pool,
    )
    latents = train.map_batches(
        LatentEncoder, fn_constructor_kwargs={"model": model}, batch_size=2000, batch_format="numpy", compute=pool
    )
    sums = [split.map_batches(pixel_sums, batch_size=2000, batch_format="numpy") for split in (train, test)]
    log.info("evaluate: scoring the test split (IWAE k=%d) on %d actors", ev.iwae_k, actors)
    test_scores, train_latents, train_sums, test_sums = collect_carrying_user_errors(scored, latents, *sums)
    sample = test.select_columns([COLUMN_ID, COLUMN_IMAGE]).take_batch(GRID, batch_format="numpy")
    return SplitResults(test_scores, train_latents, mean_image(train_sums), mean_image(test_sums), sample)


def build_report(config, manifest, info, splits: SplitResults, seconds) -> dict[str, Any]:
    import ray
    import sklearn

    scores, train_latents = splits.test_scores, splits.train_latents
    check_finite(scores)
    neg_elbo = float(scores["loss"].mean())
    neg_iwae = float(-scores["iwae"].mean())
    reconstruction = float(scores["reconstruction"].mean())
    likelihood = info["architecture"].get("likelihood", "bernoulli")
    baseline = mean_image_baseline(splits.train_mean, splits.test_mean, likelihood)
    bernoulli = likelihood == "bernoulli"
    test = {
        "likelihood": likelihood,
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
        "context": likelihood_context(scores, baseline, bernoulli),
        "posterior": posterior_health(scores["z_mean"], scores["z_log_var"], reconstruction, baseline),
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


def likelihood_context(scores: dict[str, np.ndarray], baseline: float, bernoulli: bool) -> dict[str, Any]:
    """What the bound is set against: the best any Bernoulli decoder can reach (none for a
    continuous Bernoulli) and the mean-image baseline."""
    return {
        # A continuous Bernoulli density is unbounded at 0 and 1: no finite floor.
        "reconstruction_floor": float(scores["pixel_entropy"].mean()) if bernoulli else None,
        "mean_image_baseline": baseline,
        "note": (
            "floor: summed pixel entropy, the best any Bernoulli decoder can reach; "
            "baseline: independent Bernoullis at the training mean image"
            if bernoulli
            else "continuous Bernoulli: a density on [0, 1]^784, so these nats are not comparable with a "
            "Bernoulli model's; no floor (the density is unbounded at 0 and 1); baseline: independent "
            "continuous Bernoullis whose means are the training mean image"
        ),
    }


def check_finite(scores: dict[str, np.ndarray]) -> None:
    for key in ("loss", "reconstruction", "kl", "iwae"):
        bad = int((~np.isfinite(scores[key])).sum())
        if bad:
            raise PipelineError(f"evaluate: {bad} test examples give a non-finite {key} (diverged model?)")


def run_in(run: StageRun) -> None:
    evaluate(
        run.config,
        run.directory("ingest"),
        run.directory("train"),
        run.directory("evaluate"),
        verbose=run.verbose,
        parquet=run.parquet,
    )


def check_done(directory: Path) -> None:
    """Nothing beyond the output's hash and marker: the report is read, never rebuilt from."""
