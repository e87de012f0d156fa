import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

from tests.helpers import REAL_DATA_DIR, free_port, has_real_data  # noqa: E402

# The S3 server the `s3` fixture starts on loopback: its address is in the environment from
# the start, so that every process the tests start (local Ray, `ray start` nodes, CLI
# subprocesses) reaches it the way a cluster's pods reach their object store.
S3_PORT = free_port()
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
)
for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
    os.environ.pop(name, None)

import pytest  # noqa: E402

from tests.s3 import S3Server  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's) on 127.0.0.1, for the whole session."""
    server = S3Server(S3_PORT)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A new, empty bucket; returns its s3:// URI."""
    return s3_server.new_bucket(request.node.name)


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
    from pipeline.stages.ingest import ingest
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
    from pipeline.stages.train import train

    config = load_config(
        overrides=[
            "model.preset=seed",
            "model.latent_dim=4",
            "model.context=rows",
            "train.epochs=3",
            "train.batch_size=64",
            "train.num_workers=2",
            "train.cpus_per_worker=1",
        ]
    )
    out = tmp_path_factory.mktemp("train") / "run"
    return train(config, small_dataset, out)


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, small_dataset, trained_run):
    """`trained_run` exported by the real export stage (verified against Keras)."""
    from pipeline.config import load_config
    from pipeline.stages.export import export

    out = tmp_path_factory.mktemp("artifact") / "artifact"
    return export(load_config(), trained_run.out, out, data_dir=small_dataset)


@pytest.fixture(scope="session")
def ray_nodes(s3_server):
    """A Ray cluster of three nodes on this machine: a head with the Jobs API and no CPUs,
    and two worker nodes `w1` and `w2` of 3 logical CPUs each; the S3 server is up first,
    so that every node has its address.

    Its temp dir is a short one under /tmp, not pytest's: Ray's Unix sockets live in it,
    and a socket path may not pass 107 bytes (pytest's `pytest-of-root/pytest-101/...`
    did, once the counter reached three digits)."""
    import shutil
    import tempfile

    from tests.cluster import LocalCluster

    temp_dir = tempfile.mkdtemp(prefix="vae-rc-", dir="/tmp")
    cluster = LocalCluster(temp_dir)
    try:
        cluster.start_head()
        for name in ("w1", "w2"):
            cluster.add_worker(name, cpus=3)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
