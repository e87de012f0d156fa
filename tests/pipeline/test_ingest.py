import gzip
import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.dataset import content_sha256, read_split
from pipeline.data.progressive import ProgressiveArray
from pipeline.errors import PipelineError
from pipeline.schema import FULL_SPLIT_ROWS, IDX_FILES, MANIFEST_FILE
from pipeline.stages.ingest import ingest
from tests.helpers import (
    REAL_DATA_DIR,
    has_real_data,
    idx_bytes,
    synthetic_split,
    tree_snapshot,
    write_idx_dir,
)


def config_for(source, limit=None, rows_per_file=4):
    overrides = [f"data.source=idx:{source}", f"data.rows_per_file={rows_per_file}"]
    if limit is not None:
        overrides.append(f"data.limit={limit}")
    return load_config(overrides=overrides)


def test_ingest_writes_sharded_parquet_and_manifest(tmp_path):
    source = write_idx_dir(tmp_path / "idx", train_rows=10, test_rows=2)
    result = ingest(config_for(source, limit=10), tmp_path / "out")
    out = result.out
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["rows"] == {"train": 10, "test": 2}
    assert manifest["class_counts"]["train"] == [1] * 10
    assert manifest["source"]["kind"] == "idx"
    assert set(manifest["source"]["sha256"]) == {n for pair in IDX_FILES.values() for n in pair}
    assert "pyarrow" in manifest["versions"]
    images, labels = read_split(out, "train")
    expected_images, expected_labels = synthetic_split(10, 0)
    assert images.dtype == np.uint8 and images.shape == (10, 28, 28)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)


def test_parquet_schema_carries_class_names_and_compression(tmp_path):
    import pyarrow.parquet as pq

    source = write_idx_dir(tmp_path / "idx")
    out = ingest(config_for(source, limit=10), tmp_path / "out").out
    path = out / "train" / "part-00000.parquet"
    schema = pq.read_schema(path)
    assert json.loads(schema.metadata[b"class_names"])[9] == "Ankle boot"
    assert pq.ParquetFile(path).metadata.row_group(0).column(1).compression == "ZSTD"


def test_ray_data_reads_images_as_uint8_arrays(tmp_path, ray_local):
    import ray.data

    source = write_idx_dir(tmp_path / "idx", train_rows=10, test_rows=2)
    out = ingest(config_for(source, limit=10), tmp_path / "out").out
    batch = ray.data.read_parquet(str(out / "train")).take_batch(10, batch_format="numpy")
    assert batch["image"].dtype == np.uint8
    assert batch["image"].shape == (10, 28, 28)
    order = np.argsort(batch["id"])
    np.testing.assert_array_equal(batch["image"][order], synthetic_split(10, 0)[0])


def test_rerun_is_a_noop_and_force_rebuilds(tmp_path):
    source = write_idx_dir(tmp_path / "idx")
    config = config_for(source, limit=10)
    first = ingest(config, tmp_path / "out")
    stamp = os.stat(first.out / MANIFEST_FILE).st_mtime_ns
    second = ingest(config, tmp_path / "out")
    assert second.skipped and os.stat(first.out / MANIFEST_FILE).st_mtime_ns == stamp
    third = ingest(config, tmp_path / "out", force=True)
    assert not third.skipped
    assert third.manifest["content_sha256"] == first.manifest["content_sha256"]


def test_content_hash_ignores_file_layout(tmp_path):
    source = write_idx_dir(tmp_path / "idx")
    a = ingest(config_for(source, limit=10, rows_per_file=3), tmp_path / "a").manifest
    b = ingest(config_for(source, limit=10, rows_per_file=100), tmp_path / "b").manifest
    assert a["content_sha256"] == b["content_sha256"]
    decoded = {"train": synthetic_split(10, 0), "test": synthetic_split(2, 1)}
    assert a["content_sha256"] == content_sha256(
        {split: (ProgressiveArray.complete(images), labels) for split, (images, labels) in decoded.items()}
    )


def test_without_limit_partial_data_is_rejected(tmp_path):
    source = write_idx_dir(tmp_path / "idx")
    with pytest.raises(PipelineError, match="train split has 10 rows, expected 60000"):
        ingest(config_for(source), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def corrupt_truncated_gzip(directory):
    path = directory / IDX_FILES["train"][0]
    path.write_bytes(path.read_bytes()[:-20])
    return path.name, "corrupt or truncated gzip"


def corrupt_missing_trailer(directory):
    path = directory / IDX_FILES["train"][0]
    path.write_bytes(path.read_bytes()[:-8])  # every pixel is there, the CRC and length are not
    return path.name, "corrupt or truncated gzip"


def corrupt_not_gzip(directory):
    path = directory / IDX_FILES["test"][1]
    path.write_bytes(b"this is not gzip at all")
    return path.name, "corrupt or truncated gzip"


def corrupt_checksum(directory):
    path = directory / IDX_FILES["train"][0]
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer's CRC-32
    path.write_bytes(bytes(data))
    return path.name, "corrupt or truncated gzip"


def corrupt_trailing_data(directory):
    path = directory / IDX_FILES["test"][0]
    path.write_bytes(path.read_bytes() + b"garbage")
    return path.name, "corrupt or truncated gzip"


def corrupt_magic(directory):
    path = directory / IDX_FILES["train"][1]
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[2:4] = b"\x0d\x01"
    path.write_bytes(gzip.compress(bytes(data)))
    return path.name, "wrong IDX magic number"


def corrupt_count_mismatch(directory):
    path = directory / IDX_FILES["train"][1]
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(9, np.uint8))))
    return "train", "10 images but 9 labels"


def corrupt_payload_length(directory):
    path = directory / IDX_FILES["test"][0]
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))
    return path.name, "header says"


def corrupt_label_range(directory):
    path = directory / IDX_FILES["test"][1]
    path.write_bytes(gzip.compress(idx_bytes(np.array([3, 12], np.uint8))))
    return "test", "label 12 outside 0-9"


def corrupt_missing_file(directory):
    path = directory / IDX_FILES["test"][0]
    path.unlink()
    return path.name, "file not found"


def corrupt_image_dims(directory):
    path = directory / IDX_FILES["train"][0]
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((10, 28, 27), np.uint8))))
    return "train", "expected (N, 28, 28)"


@pytest.mark.parametrize(
    "corrupt",
    [
        corrupt_truncated_gzip,
        corrupt_missing_trailer,
        corrupt_not_gzip,
        corrupt_checksum,
        corrupt_trailing_data,
        corrupt_magic,
        corrupt_count_mismatch,
        corrupt_payload_length,
        corrupt_label_range,
        corrupt_missing_file,
        corrupt_image_dims,
    ],
)
def test_corrupt_source_fails_with_one_line_and_keeps_old_output(tmp_path, corrupt, capsys):
    good = write_idx_dir(tmp_path / "good")
    out = tmp_path / "out"
    ingest(config_for(good, limit=10), out)
    before = tree_snapshot(out)
    bad = write_idx_dir(tmp_path / "bad", seed=5)
    where, problem = corrupt(bad)
    code = main(["ingest", "--source", f"idx:{bad}", "--out", str(out), "--limit", "10", "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("vae-pipeline: error: ")
    assert where in err[0] and problem in err[0]
    assert tree_snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_cli_help_lists_only_working_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for command in ("ingest", "train"):
        assert command in text


def test_tfds_source_through_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    config = load_config(overrides=["data.source=tfds", "data.limit=5"])
    with tfds.testing.mock_data(num_examples=6):
        result = ingest(config, tmp_path / "out")
    assert result.manifest["source"]["kind"] == "tfds"
    assert result.manifest["rows"] == {"train": 5, "test": 5}
    images, labels = read_split(result.out, "test")
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8
    assert labels.max() <= 9


def test_auto_source_prefers_env_dir(tmp_path, monkeypatch):
    from pipeline.data.sources import resolve_source

    source = write_idx_dir(tmp_path / "idx")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(source))
    assert resolve_source("auto") == ("idx", source)


@pytest.mark.skipif(not has_real_data(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_full_ingest(tmp_path):
    result = ingest(load_config(overrides=[f"data.source=idx:{REAL_DATA_DIR}"]), tmp_path / "out")
    manifest = result.manifest
    assert manifest["rows"] == {"train": 60000, "test": 10000}
    assert manifest["class_counts"]["train"] == [6000] * 10
    assert manifest["class_counts"]["test"] == [1000] * 10
    assert len(list((result.out / "train").glob("*.parquet"))) == 6
    images, labels = read_split(result.out, "test")
    assert images.shape == (10000, 28, 28) and labels[:3].tolist() == [9, 2, 1]


# The files Zalando published were gzipped on 2017-08-31 with their names in the header.
# The Debian package keeps their deflate streams but rewrote the header (no name, the
# packaging date), so the originals, which tfds' registered checksums describe, are
# Debian's bytes after the 10-byte header under the original header.
ORIGINAL_GZIP_MTIME = {"train": 1504176606, "t10k": 1504176627}
TFDS_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def original_gzip(path):
    data = path.read_bytes()
    assert data[:4] == b"\x1f\x8b\x08\x00"  # gzip, deflate, no optional fields
    name = path.name.removesuffix(".gz")
    mtime = ORIGINAL_GZIP_MTIME[name.split("-")[0]]
    return b"\x1f\x8b\x08\x08" + struct.pack("<I", mtime) + b"\x00\x03" + name.encode() + b"\x00" + data[10:]


@pytest.fixture
def dataset_proxy(monkeypatch):
    """A forward HTTP proxy on 127.0.0.1 standing in for the dataset's server: tfds' real
    download code reaches it through the standard http_proxy variable. Serves the files
    in `proxy.files` (name -> bytes), 404 for anything else; records what was asked."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            proxy.requests.append(self.path)
            body = proxy.files.get(self.path.rsplit("/", 1)[-1]) if self.path.startswith(TFDS_URL) else None
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    proxy.files, proxy.requests = {}, []
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{proxy.server_address[1]}"
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", url)
    monkeypatch.setenv("HTTP_PROXY", url)
    yield proxy
    proxy.shutdown()
    # Close the listening socket too: a download tfds still had in flight when the test
    # ended (it stops at the first 404) is then refused, not left waiting forever for a
    # status line, which kept pytest from exiting (its thread is joined at exit).
    proxy.server_close()


def row_digests(images, labels):
    """The multiset of (image, label) rows, order-free: tfds stores examples shuffled."""
    return sorted(
        hashlib.sha1(image.tobytes() + bytes([label])).digest() for image, label in zip(images, labels, strict=True)
    )


@pytest.mark.realdata
@pytest.mark.skipif(not has_real_data(), reason="Debian dataset-fashion-mnist not installed")
def test_tfds_source_downloads_verifies_and_reads_the_real_files(tmp_path, dataset_proxy):
    from pipeline.data.sources import load_idx_dir, load_tfds

    names = [name for pair in IDX_FILES.values() for name in pair]
    dataset_proxy.files = {name: original_gzip(REAL_DATA_DIR / name) for name in names}
    source = load_tfds(str(tmp_path / "tfds"))  # tfds checks each file's registered SHA-256
    assert sorted(dataset_proxy.requests) == sorted(TFDS_URL + name for name in names)
    assert source.kind == "tfds"
    with ThreadPoolExecutor(2) as pool:
        idx = load_idx_dir(REAL_DATA_DIR, pool)
        for split in ("train", "test"):
            images, labels = source.splits[split]
            assert len(labels) == FULL_SPLIT_ROWS[split]
            idx_images, idx_labels = idx.splits[split]
            assert row_digests(images.rows(), labels) == row_digests(idx_images.rows(), idx_labels)


def test_tfds_download_failure_is_one_line(tmp_path, capsys, dataset_proxy):
    from pipeline.data.sources import load_tfds

    with pytest.raises(PipelineError) as info:  # the proxy has no files: every URL is a 404
        load_tfds(str(tmp_path / "tfds"))
    message = str(info.value)
    assert message.startswith("tfds fashion_mnist: ") and "404" in message and "\n" not in message
    assert dataset_proxy.requests and all(r.startswith(TFDS_URL) for r in dataset_proxy.requests)
    assert capsys.readouterr().out == ""  # tfds' own notices stay off stdout
