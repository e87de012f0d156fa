"""The Docker, Kubernetes and cron examples run real `vae-pipeline` commands."""

import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.cli import make_parser

ROOT = Path(__file__).resolve().parent.parent


def parses(argv):
    args = make_parser().parse_args(argv)
    assert callable(args.func)
    return args


def test_rayjob_entrypoint_is_a_pipeline_command():
    manifest = yaml.safe_load((ROOT / "examples/k8s/rayjob.yaml").read_text())
    assert manifest["kind"] == "RayJob"
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[0] == "vae-pipeline"
    args = parses(argv[1:])
    assert args.command == "run" and str(args.runs_root) == "/runs"
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "vae-pipeline:cpu"


def test_cronjob_runs_submit():
    manifest = yaml.safe_load((ROOT / "examples/k8s/cronjob.yaml").read_text())
    container = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    args = parses(container["args"])
    assert args.command == "submit" and args.address.endswith(":8265")


def test_cron_line_runs_the_pipeline():
    line = next(li for li in (ROOT / "examples/cron.txt").read_text().splitlines() if li and not li.startswith("#"))
    command = line.split(None, 5)[5].split("&&")[1].split(">>")[0]
    argv = shlex.split(command)
    assert argv[0].endswith("vae-pipeline")
    assert parses(argv[1:]).command == "run"


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.inference"])
def test_dockerfile_entrypoints(name):
    text = (ROOT / "docker" / name).read_text()
    entry = next(li for li in text.splitlines() if li.startswith("ENTRYPOINT"))
    cmd = next(li for li in text.splitlines() if li.startswith("CMD"))
    entry_argv, cmd_argv = yaml.safe_load(entry.split(None, 1)[1]), yaml.safe_load(cmd.split(None, 1)[1])
    if name == "Dockerfile.inference":
        from deploy.cli import main  # noqa: F401  (the module the image runs)

        assert entry_argv[:3] == ["python", "-m", "deploy.cli"]
        assert "tensorflow" not in text.lower().replace("no tensorflow", "")
    else:
        assert entry_argv == ["vae-pipeline"]
        assert parses(cmd_argv).command == "run"
