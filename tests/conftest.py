import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import pytest  # noqa: E402

from tests.helpers import REAL_DATA_DIR, has_real_data  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray for the session (3 logical CPUs: 2 workers + Ray Data)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """An ingested 1,024/512-row dataset: real Fashion-MNIST when installed, else synthetic."""
    from pipeline.config import load_config
    from pipeline.ingest import ingest
    from tests.helpers import write_idx_dir

    root = tmp_path_factory.mktemp("data")
    source = REAL_DATA_DIR if has_real_data() else write_idx_dir(root / "idx", 1024, 512)
    config = load_config(overrides=[f"data.source=idx:{source}", "data.limit=1024", "data.rows_per_file=256"])
    return ingest(config, root / "dataset").out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, small_dataset, ray_local):
    """A tiny model trained by the real train stage with 2 workers (3 epochs), with the
    default preset's pixel context so that evaluate, export and deploy run through it."""
    from pipeline.config import load_config
    from pipeline.train import train

    config = load_config(
        overrides=[
            "model.preset=seed",
            "model.latent_dim=4",
            "model.context=above",
            "train.epochs=3",
            "train.batch_size=64",
            "train.num_workers=2",
        ]
    )
    out = tmp_path_factory.mktemp("train") / "run"
    return train(config, small_dataset, out)
