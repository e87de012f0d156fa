import base64
import json
import re

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.dataset import read_split
from pipeline.errors import PipelineError
from pipeline.stages.evaluate import evaluate, example_noise, score_batch
from pipeline.training.model_store import load_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, small_dataset, trained_run):
    config = load_config(overrides=["evaluate.iwae_k=8"])
    return evaluate(config, small_dataset, trained_run.out, tmp_path_factory.mktemp("eval") / "eval")


def finite_numbers(value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, (int, float)):
        return np.isfinite(value)
    if isinstance(value, list):
        return all(finite_numbers(v) for v in value)
    if isinstance(value, dict):
        return all(finite_numbers(v) for v in value.values())
    return False


def test_report_has_every_field_with_finite_values(evaluation):
    report = json.loads((evaluation.out / "report.json").read_text())
    for key in ("neg_elbo", "reconstruction", "kl", "neg_elbo_bits_per_dim", "neg_iwae", "neg_iwae_bits_per_dim"):
        assert key in report["test"]
    for key in ("kmeans_nmi", "kmeans_ari", "silhouette_true_labels", "knn_accuracy"):
        assert key in report["clustering"]
    for key in ("active_units", "kl_per_dimension", "posterior_collapse"):
        assert key in report["posterior"]
    assert report["test"]["examples"] == 1024
    assert len(report["posterior"]["kl_per_dimension"]) == 4
    assert report["context"]["reconstruction_floor"] < report["context"]["mean_image_baseline"]
    assert report["data"]["content_sha256"] == report["model"]["data_sha256"]
    assert finite_numbers(report)
    assert report["test"]["neg_elbo"] == pytest.approx(report["test"]["reconstruction"] + report["test"]["kl"])
    assert report["test"]["neg_elbo_bits_per_dim"] == pytest.approx(report["test"]["neg_elbo"] / (784 * np.log(2)))


def test_iwae_bound_is_at_least_the_elbo(evaluation):
    test = evaluation.report["test"]
    # As log-likelihood estimates: IWAE >= ELBO, i.e. -IWAE <= -ELBO.
    assert test["neg_iwae"] <= test["neg_elbo"]


def test_stage_elbo_equals_vae_functions_on_the_same_batch(small_dataset, trained_run):
    from vae import neg_elbo, reparameterize

    model, _ = load_model(trained_run.out)
    images, labels = read_split(small_dataset, "test")
    ids = np.arange(16)
    batch = {"id": ids, "image": images[:16], "label": labels[:16]}
    scores = score_batch(model, batch, iwae_k=2, seed=0)
    x = images[:16, ..., None].astype(np.float32) / 255.0
    z_mean, z_log_var = model.encoder(x)
    logits = model.logits(reparameterize(z_mean, z_log_var, example_noise(ids, 0, (4,))), x)
    expected = np.asarray(neg_elbo(x, logits, z_mean, z_log_var)[0])
    np.testing.assert_allclose(scores["loss"], expected, rtol=1e-5)
    # The same example gets the same value in a different batch.
    again = score_batch(model, {k: v[8:] for k, v in batch.items()}, iwae_k=2, seed=0)
    np.testing.assert_allclose(again["loss"], scores["loss"][8:], rtol=1e-5)


def test_plots_are_pngs_and_html_inlines_them(evaluation):
    names = evaluation.report["plots"]
    assert {"latent_scatter.png", "prior_samples.png", "reconstructions.png", "training_curves.png"} <= set(names)
    for name in names:
        assert (evaluation.out / name).read_bytes()[:8] == PNG_MAGIC
    page = (evaluation.out / "report.html").read_text()
    inlined = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(inlined) == len(names)
    assert all(base64.b64decode(data)[:8] == PNG_MAGIC for data in inlined)
    assert "http" not in page.split("<body>")[1]


def test_missing_model_is_a_clear_error(tmp_path, small_dataset):
    with pytest.raises(PipelineError, match="no trained model"):
        evaluate(load_config(), small_dataset, tmp_path / "nothing", tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_image_shape_mismatch_is_a_clear_error(tmp_path, small_dataset):
    from pipeline.training.model_store import write_model_dir
    from vae import VAEConfig, build_vae

    architecture = VAEConfig(latent_dim=2, image_shape=(32, 32, 1))
    (tmp_path / "saved").mkdir()
    build_vae(architecture, seed=0).save(tmp_path / "saved" / "vae.keras")
    write_model_dir(tmp_path / "train", tmp_path / "saved", {"architecture": architecture.to_dict()})
    with pytest.raises(PipelineError, match=r"model expects images of shape \(32, 32, 1\)"):
        evaluate(load_config(), small_dataset, tmp_path / "train", tmp_path / "eval")


def test_a_model_json_that_disagrees_with_vae_keras_is_refused(tmp_path, small_dataset, trained_run):
    import shutil

    model_dir = tmp_path / "train"
    shutil.copytree(trained_run.out / "model", model_dir / "model")
    info_path = model_dir / "model" / "model.json"
    info = json.loads(info_path.read_text())
    info["architecture"]["latent_dim"] = 8
    info_path.write_text(json.dumps(info))
    with pytest.raises(PipelineError, match="vae.keras: holds another architecture than model.json records"):
        evaluate(load_config(), small_dataset, model_dir, tmp_path / "eval")


def test_manifold_plot_for_two_dimensional_latent(tmp_path):
    from pipeline.report.plots import image_grid

    grid = image_grid(np.ones((5, 28, 28)), columns=2)
    assert grid.shape == (3 * 28, 2 * 28) and grid[-28:, 28:].sum() == 0


def test_a_file_dropped_into_the_report_stops_its_replacement(tmp_path, capsys, evaluation, small_dataset, trained_run):
    import shutil

    from pipeline.cli import main
    from tests.helpers import single_error_line, tree_snapshot

    out = tmp_path / "eval"
    shutil.copytree(evaluation.out, out)
    (out / "my_plot.png").write_bytes(PNG_MAGIC)
    before = tree_snapshot(out)
    argv = ["evaluate", "--data", str(small_dataset), "--model", str(trained_run.out), "--out", str(out)]
    assert main(argv) == 2
    assert "did not write (my_plot.png)" in single_error_line(capsys.readouterr().err)
    assert tree_snapshot(out) == before


class FailingScorer:
    """A Ray Data actor that fails the way a damaged input would, inside the actor."""

    def __call__(self, batch):
        raise PipelineError("model/model.json: unreadable JSON (a test)")


def test_a_user_error_in_a_ray_data_actor_comes_back_as_its_own_line(ray_local):
    import ray.data

    from pipeline.stages.evaluate import collect_carrying_user_errors

    dataset = ray.data.range(4).map_batches(
        FailingScorer, batch_size=2, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1)
    )
    with pytest.raises(PipelineError) as info:
        collect_carrying_user_errors(dataset)
    assert str(info.value) == "model/model.json: unreadable JSON (a test)"


def _rss_kib(field: str) -> int:
    status = open("/proc/self/status").read()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1))


def peak_rss_growth_kib(call) -> int:
    """How far this process's resident memory rose above its level at the start of `call`
    (Linux: writing 5 to clear_refs resets the peak, VmHWM)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _rss_kib("VmRSS")
    call()
    return _rss_kib("VmHWM") - before


def test_the_driver_holds_no_split_of_images(tmp_path, evaluation, trained_run):
    """Evaluate's driver memory must not grow with the training split: with 2,000 and
    18,000 training rows (synthetic, the same test split) its peaks must differ by far
    less than the 16,000 extra images take (12.3 MB as uint8; the code before read the
    split and made a float64 copy, 8 times that)."""
    from pipeline.stages.ingest import ingest
    from tests.helpers import write_idx_dir

    config = load_config(overrides=["evaluate.iwae_k=1", "evaluate.batch_size=256"])
    growth = {}
    for rows in (2_000, 18_000):
        source = write_idx_dir(tmp_path / f"idx-{rows}", train_rows=rows, test_rows=256, seed=1)
        data = ingest(
            load_config(overrides=[f"data.source=idx:{source}", f"data.limit={rows}", "data.rows_per_file=1000"]),
            tmp_path / f"data-{rows}",
        ).out
        out = tmp_path / f"eval-{rows}"
        growth[rows] = peak_rss_growth_kib(lambda data=data, out=out: evaluate(config, data, trained_run.out, out))
        assert (out / "report.json").is_file()
    extra_images_kib = 16_000 * 784 / 1024
    assert growth[18_000] - growth[2_000] < 0.5 * extra_images_kib, growth
