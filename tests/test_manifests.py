"""The Docker, Kubernetes and cron examples run real `vae-pipeline` commands."""

import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.cli import make_parser
from pipeline.storage import is_uri

ROOT = Path(__file__).resolve().parent.parent


def parses(argv):
    args = make_parser().parse_args(argv)
    assert callable(args.func)
    return args


def pod_templates(cluster_spec):
    yield cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["template"]["spec"]


def test_rayjob_runs_the_pipeline_into_storage_every_pod_reaches():
    manifest = yaml.safe_load((ROOT / "examples/k8s/rayjob.yaml").read_text())
    assert manifest["kind"] == "RayJob"
    # Ray Jobs runs the entrypoint in a shell on the head, whose environment has the ConfigMap.
    entrypoint = manifest["spec"]["entrypoint"].replace("$VAE_PIPELINE_RUNS", "s3://my-bucket/vae-runs")
    argv = shlex.split(entrypoint)
    assert argv[0] == "vae-pipeline"
    args = parses(argv[1:])
    assert args.command == "run" and is_uri(args.runs_root)
    cluster = manifest["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for pod in pod_templates(cluster):
        assert "volumes" not in pod  # no disk that only some pods see
        container = pod["containers"][0]
        assert container["image"] == "vae-pipeline:cpu" and "volumeMounts" not in container
        sources = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in container["envFrom"]}
        assert sources == {"secretRef": "vae-pipeline-s3", "configMapRef": "vae-pipeline-storage"}


def test_cronjob_submits_into_the_configured_store():
    manifest = yaml.safe_load((ROOT / "examples/k8s/cronjob.yaml").read_text())
    container = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item["valueFrom"]["configMapKeyRef"] for item in container["env"]}
    assert env["VAE_PIPELINE_RUNS"] == {"name": "vae-pipeline-storage", "key": "VAE_PIPELINE_RUNS"}
    # Kubernetes replaces $(NAME) in args with the container's variable.
    argv = [arg.replace("$(VAE_PIPELINE_RUNS)", "s3://my-bucket/vae-runs") for arg in container["args"]]
    args = parses(argv)
    assert args.command == "submit" and args.address.endswith(":8265") and is_uri(args.runs_root)


def test_rayservice_serves_the_fetched_artifact_with_deploy_serve(tmp_path):
    manifest = yaml.safe_load((ROOT / "examples/k8s/rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    (application,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    module, _, name = application["import_path"].partition(":")
    import importlib

    builder = getattr(importlib.import_module(module), name)
    # The builder refuses what it does not know, and checks the artifact before any replica starts.
    with pytest.raises(ValueError, match="takes model"):
        builder({**application["args"], "max_batchsize": "1"})
    from deploy.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="no SHA256SUMS"):
        builder({**application["args"], "model": str(tmp_path)})
    for pod in pod_templates(manifest["spec"]["rayClusterConfig"]):
        (fetch,) = pod["initContainers"]
        argv = [arg.replace("$(VAE_PIPELINE_RUNS)", "s3://my-bucket/vae-runs") for arg in fetch["args"]]
        args = parses(argv)
        assert args.command == "fetch" and args.run == "s3://my-bucket/vae-runs/champion"
        assert str(args.out) == application["args"]["model"]
        mounts = {m["mountPath"] for c in [fetch, *pod["containers"]] for m in c["volumeMounts"]}
        assert mounts == {application["args"]["model"]}
        assert pod["containers"][0]["image"] == "vae-serve"


def test_cron_line_runs_the_pipeline():
    line = next(li for li in (ROOT / "examples/cron.txt").read_text().splitlines() if li and not li.startswith("#"))
    command = line.split(None, 5)[5].split("&&")[1].split(">>")[0]
    argv = shlex.split(command)
    assert argv[0].endswith("vae-pipeline")
    assert parses(argv[1:]).command == "run"


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.inference"])
def test_dockerfile_entrypoints(name):
    text = (ROOT / "docker" / name).read_text()
    entry = [li for li in text.splitlines() if li.startswith("ENTRYPOINT")][-1]  # the default (last) stage
    cmd = [li for li in text.splitlines() if li.startswith("CMD")][-1]
    entry_argv, cmd_argv = yaml.safe_load(entry.split(None, 1)[1]), yaml.safe_load(cmd.split(None, 1)[1])
    if name == "Dockerfile.inference":
        from deploy.cli import main  # noqa: F401  (the module the image runs)

        assert entry_argv[:3] == ["python", "-m", "deploy.cli"]
        assert "tensorflow" not in text.lower().replace("no tensorflow", "")
        serve_entry = next(li for li in text.splitlines() if li.startswith("ENTRYPOINT") and '"serve"' in li)
        serve_cmd = next(li for li in text.splitlines() if li.startswith("CMD") and "--host" in li)
        argv = yaml.safe_load(serve_entry.split(None, 1)[1])[3:] + yaml.safe_load(serve_cmd.split(None, 1)[1])
        assert argv[:3] == ["serve", "--model", "/model"] and "0.0.0.0" in argv
        from deploy.cli import serve_main  # noqa: F401
    else:
        assert entry_argv == ["vae-pipeline"]
        assert parses(cmd_argv).command == "run"
