"""scripts/wheelhouse.py: wheels built here, split into parts, checked, joined and
installed offline into a new virtualenv (a small requirement stands in for the train
extra, which is the same code path at 600 MB)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "wheelhouse.py"
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"

pytestmark = pytest.mark.slow


def wheelhouse(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheelhouse") / "parts"
    have = tmp_path_factory.mktemp("have") / "have.txt"
    have.write_text("# what the target has\nsix==1.16.0\n")
    result = wheelhouse(
        "build", str(out), "--python", PYTHON, "--requirement", "six", "--requirement", "tomli",
        "--part-mib", "1", "--level", "3", "--have", str(have),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_build_splits_the_packed_wheels_into_parts_no_larger_than_asked(parts):
    manifest = json.loads((parts / "wheelhouse.json").read_text())
    assert manifest["python"] == PYTHON and manifest["requirements"] == ["six", "tomli"]
    assert any(name.startswith("tomli-") for name in manifest["wheels"])
    assert manifest["project_wheel"].startswith("vae_pipeline-")
    assert [name.split("-")[0] for name in manifest["left_out_as_present"]] == ["six"]
    sizes = [(parts / part["name"]).stat().st_size for part in manifest["parts"]]
    assert len(sizes) >= 2 and max(sizes) <= 1 << 20  # the project wheel carries the web page's files


def test_install_makes_a_virtualenv_offline_that_imports_the_project(parts, tmp_path):
    venv = tmp_path / "venv"
    result = wheelhouse("install", str(parts), str(venv), "--system-site-packages")
    assert result.returncode == 0, result.stderr[-3000:]
    code = "import deploy.artifact, six, tomli; print(deploy.artifact.__file__)"
    shown = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.strip().startswith(str(venv))  # the installed copy, not the checkout


def test_a_damaged_part_is_named_and_nothing_is_installed(parts, tmp_path):
    copy = tmp_path / "parts"
    copy.mkdir()
    for path in parts.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    damaged = copy / "wheelhouse.tar.zst.001"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    result = wheelhouse("install", str(copy), str(tmp_path / "venv"))
    assert result.returncode == 1
    assert (
        result.stderr.strip() == f"wheelhouse: {damaged} does not match its SHA-256 (damaged or cut off); copy it again"
    )
    assert not (tmp_path / "venv").exists()
