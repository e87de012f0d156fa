"""No stage deletes or replaces what it did not write: every refusal is one line, exit 2,
and leaves every byte at the output path as it was."""

import json
import shutil
import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.outputs import check_output, read_marker, stage_output
from pipeline.schema import OUTPUT_MARKER
from tests.helpers import tree_snapshot, write_idx_dir

TINY_TRAIN = ["--set", "model.preset=seed", "--set", "model.latent_dim=4", "--set", "train.batch_size=64"]


@pytest.fixture(scope="module")
def idx_source(tmp_path_factory):
    return write_idx_dir(tmp_path_factory.mktemp("idx"), train_rows=16, test_rows=4)


def stage_argv(stage, out, idx_source, small_dataset, trained_run):
    return {
        "ingest": ["ingest", "--source", f"idx:{idx_source}", "--limit", "16", "--out", str(out)],
        "train": ["train", "--data", str(small_dataset), "--out", str(out), "--epochs", "1", *TINY_TRAIN],
        "evaluate": ["evaluate", "--data", str(small_dataset), "--model", str(trained_run.out), "--out", str(out)],
        "export": ["export", "--model", str(trained_run.out), "--out", str(out)],
    }[stage]


def snapshot(path):
    return tree_snapshot(path) if path.is_dir() else path.read_bytes()


def refused(capsys, argv, path, message):
    """Run the CLI; assert exit 2, one error line naming `path` and holding `message`."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("vae-pipeline: error: ") and str(path) in err[0] and message in err[0], err[0]


def foreign_directory(tmp_path, *_):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me\n")
    return target, "was not written by vae-pipeline"


def regular_file(tmp_path, *_):
    target = tmp_path / "mine.txt"
    target.write_text("keep me\n")
    return target, "exists and is not a directory"


def other_stage_output(tmp_path, stage, small_dataset, trained_run):
    """A real output of a different stage: training's for ingest, ingest's for the rest."""
    source = trained_run.out if stage == "ingest" else small_dataset
    target = tmp_path / "other"
    shutil.copytree(source, target, symlinks=True)
    other = "train" if stage == "ingest" else "ingest"
    return target, f"holds the output of the {other} stage, not {stage}"


@pytest.mark.parametrize("stage", ["ingest", "train", "evaluate", "export"])
@pytest.mark.parametrize("make_target", [foreign_directory, regular_file, other_stage_output])
def test_output_path_that_is_not_the_stage_s_own_is_refused_untouched(
    tmp_path, capsys, stage, make_target, idx_source, small_dataset, trained_run
):
    target, message = make_target(tmp_path, stage, small_dataset, trained_run)
    before = snapshot(target)
    refused(capsys, stage_argv(stage, target, idx_source, small_dataset, trained_run), target, message)
    assert snapshot(target) == before
    # Nothing was left beside it either (no temporary or renamed-aside copies).
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("stage", ["ingest", "train"])
def test_a_file_dropped_into_an_earlier_output_stops_its_replacement(
    tmp_path, capsys, stage, idx_source, small_dataset, trained_run
):
    source = small_dataset if stage == "ingest" else trained_run.out
    target = tmp_path / "earlier"
    shutil.copytree(source, target, symlinks=True)
    (target / "train" / "notes.txt").parent.mkdir(exist_ok=True)
    (target / "train" / "notes.txt").write_text("mine\n")
    before = snapshot(target)
    refused(
        capsys,
        stage_argv(stage, target, idx_source, small_dataset, trained_run),
        target,
        f"holds files the {stage} stage did not write (train/notes.txt)",
    )
    assert snapshot(target) == before


def test_ingest_replaces_its_own_earlier_output_and_marks_every_file(tmp_path, capsys, idx_source):
    out = tmp_path / "data"
    assert main(["ingest", "--source", f"idx:{idx_source}", "--limit", "16", "--out", str(out)]) == 0
    assert main(["ingest", "--source", f"idx:{idx_source}", "--limit", "8", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == {"train": 8, "test": 4}
    marker = read_marker(out)
    assert marker["stage"] == "ingest"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != OUTPUT_MARKER)
    assert marker["owned"] == written


def test_empty_directory_is_a_valid_output(tmp_path, idx_source):
    out = tmp_path / "empty"
    out.mkdir()
    assert check_output(out, "ingest") is False
    assert main(["ingest", "--source", f"idx:{idx_source}", "--limit", "16", "--out", str(out)]) == 0
    assert (out / "manifest.json").is_file()


def test_output_below_a_regular_file_is_one_line(tmp_path, capsys, idx_source):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused(
        capsys,
        ["ingest", "--source", f"idx:{idx_source}", "--limit", "16", "--out", str(blocker / "out")],
        blocker,
        "is not a directory",
    )
    assert blocker.read_text() == "x"


def test_read_only_file_system_is_one_line_and_keeps_the_earlier_output(tmp_path, idx_source):
    """A read-only tmpfs in a private mount namespace: read-only even for root."""
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare not installed")
    mount = tmp_path / "ro"
    mount.mkdir()
    ingest = [sys.executable, "-m", "pipeline.cli", "ingest", "--source", f"idx:{idx_source}", "--limit", "16"]
    script = (
        f"mount -t tmpfs tmpfs {mount} && {' '.join(ingest)} --out {mount}/data >/dev/null 2>&1 && "
        f"mount -o remount,ro {mount} && sha256sum {mount}/data/train/* && "
        f"{' '.join(ingest)} --limit 8 --force --out {mount}/data; echo rc=$?; sha256sum {mount}/data/train/*"
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    if "mount" in result.stderr and "rc=" not in result.stdout:
        pytest.skip(f"no private mounts here: {result.stderr.strip()[:200]}")
    lines = result.stdout.strip().splitlines()
    before, rc, after = lines[0], lines[1], lines[2]
    assert rc == "rc=2", result.stdout + result.stderr
    assert before == after
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [f"vae-pipeline: error: {mount}: cannot write output here (Read-only file system)"]


def test_a_failed_stage_removes_its_temporary_directory_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    with stage_output(out, "ingest") as tmp:
        (tmp / "a.txt").write_text("first")
    before = tree_snapshot(out)
    with pytest.raises(RuntimeError), stage_output(out, "ingest") as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError("stage failed half-way")
    assert tree_snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_temporaries_of_dead_processes_are_cleared_but_not_live_ones(tmp_path):
    dead = tmp_path / ".out.tmp-999999999-abc"  # no such process
    live = tmp_path / f".out.tmp-{1}-abc"  # init is always alive
    for directory in (dead, live):
        directory.mkdir()
        (directory / "part").write_text("x")
    with stage_output(tmp_path / "out", "ingest") as tmp:
        (tmp / "a.txt").write_text("x")
    assert not dead.exists() and live.exists()


def test_swap_in_rechecks_for_files_that_arrived_meanwhile(tmp_path):
    out = tmp_path / "out"
    with stage_output(out, "ingest") as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(PipelineError, match="did not write"), stage_output(out, "ingest") as tmp:
        (tmp / "a.txt").write_text("second")
        (out / "arrived.txt").write_text("a user's file, written while the stage ran")
    assert (out / "a.txt").read_text() == "first" and (out / "arrived.txt").is_file()
