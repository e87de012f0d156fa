"""The dataset is checked against its manifest before any stage spends time on it."""

import json
import shutil

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.dataset import check_dataset, with_dataset_section
from pipeline.errors import PipelineError
from pipeline.schema import MANIFEST_FILE


@pytest.fixture
def dataset(tmp_path, small_dataset):
    copy = tmp_path / "data"
    shutil.copytree(small_dataset, copy)
    return copy


def edit_manifest(directory, change):
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def first_part(directory, split="train"):
    return sorted((directory / split).iterdir())[0]


def wrong_row_count(directory):
    edit_manifest(directory, lambda m: m["rows"].update(train=m["rows"]["train"] + 1))
    return "its files hold 1024 rows, the manifest says 1025", False


def wrong_content_hash(directory):
    edit_manifest(directory, lambda m: m.update(content_sha256="0" * 64))
    return "differs from the manifest's 000000000000", True


def truncated_parquet(directory):
    path = first_part(directory)
    path.write_bytes(path.read_bytes()[:-100])
    return f"{path.name}: {path.stat().st_size} bytes, the manifest says", False


def flipped_byte_inside_a_page(directory):
    path = first_part(directory, "test")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, same footer: only decoding can tell
    path.write_bytes(bytes(data))
    # zstd either rejects the page or decodes it to other pixels.
    return ("unreadable Parquet data", "differs from the manifest's"), True


def stray_file(directory):
    (directory / "train" / "notes.txt").write_text("x")
    return "notes.txt: not listed in the manifest", False


def missing_file(directory):
    first_part(directory).unlink()
    return "listed in the manifest but missing", False


def wrong_file_row_count(directory):
    edit_manifest(directory, lambda m: m["files"]["train"][0].update(rows=1))
    return "rows, the manifest says 1", False


def old_format(directory):
    edit_manifest(directory, lambda m: m.update(format="vae-pipeline/dataset/v1"))
    return "expected 'vae-pipeline/dataset/v2'; ingest the data again", False


def malformed_manifest(directory):
    (directory / MANIFEST_FILE).write_text("{not json")
    return "unreadable manifest", False


CORRUPTIONS = [
    wrong_row_count,
    wrong_content_hash,
    truncated_parquet,
    flipped_byte_inside_a_page,
    stray_file,
    missing_file,
    wrong_file_row_count,
    old_format,
    malformed_manifest,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_damage_is_found_by_the_check_that_should_find_it(dataset, corrupt):
    message, needs_full = corrupt(dataset)
    if needs_full:
        check_dataset(dataset)  # the cheap check cannot see it...
    with pytest.raises(PipelineError) as info:
        check_dataset(dataset, full=True)  # ...the full one does
    assert mentions(str(info.value), message) and "\n" not in str(info.value)


def mentions(text, message):
    return any(m in text for m in ((message,) if isinstance(message, str) else message))


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_stages_refuse_damaged_data_in_one_line_before_writing(tmp_path, capsys, dataset, trained_run, corrupt, stage):
    message, _ = corrupt(dataset)
    out = tmp_path / "out"
    argv = {
        "train": ["train", "--data", str(dataset), "--out", str(out), "--set", "model.preset=seed"],
        "evaluate": ["evaluate", "--data", str(dataset), "--model", str(trained_run.out), "--out", str(out)],
    }[stage]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vae-pipeline: error: ") and mentions(err[0], message), err
    assert not out.exists()


def test_export_checks_the_files_it_reads(tmp_path, capsys, dataset, trained_run):
    truncated_parquet(dataset)
    out = tmp_path / "artifact"
    assert main(["export", "--model", str(trained_run.out), "--data", str(dataset), "--out", str(out)]) == 2
    assert "the manifest says" in capsys.readouterr().err
    assert not out.exists()


def test_an_explicit_limit_that_differs_from_the_data_is_an_error(small_dataset):
    manifest = check_dataset(small_dataset)
    with pytest.raises(PipelineError, match="data.limit is 512, but .* was ingested with limit 1024"):
        with_dataset_section(load_config(overrides=["data.limit=512"]), manifest, small_dataset)


def test_the_recorded_config_says_which_data_applied(small_dataset, trained_run):
    # trained_run's config left data.limit unset; the dataset was ingested with 1,024 rows.
    recorded = json.loads((trained_run.out / "config.json").read_text())
    assert recorded["data"] == json.loads((small_dataset / "config.json").read_text())["data"]
    assert recorded["data"]["limit"] == 1024
    model = json.loads((trained_run.out / "model" / "model.json").read_text())
    assert model["config"]["data"]["limit"] == 1024
