"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and catch a breach."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # The packages under `root` come first on the path, before the installed copy.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS)], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_every_import_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def test_a_stage_importing_another_and_deploy_importing_keras_are_caught(tmp_path):
    for name in ("pipeline", "vae", "deploy"):
        shutil.copytree(
            ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("node_modules", "ort", "__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "pipeline" / "stages" / "export.py", "a") as handle:
        handle.write("\nfrom pipeline.stages.train import TRAIN_OUTPUTS  # a breach\n")
    with open(tmp_path / "deploy" / "png.py", "a") as handle:
        handle.write("\nimport keras  # a breach\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    assert "pipeline.stages.export -> pipeline.stages.train" in result.stdout
    assert "deploy.png -> keras" in result.stdout
    assert "2 broken" in result.stdout


def test_the_image_shape_is_one_fact_across_packages_that_may_not_import_each_other():
    """`vae` and `deploy` may not import each other (the contracts above), so each states
    the image shape; the pipeline's schema takes deploy's. They must agree."""
    from deploy.artifact import IMAGE_SHAPE
    from pipeline.schema import IMAGE_TENSOR_SHAPE
    from vae.config import VAEConfig

    assert VAEConfig().image_shape == IMAGE_SHAPE == IMAGE_TENSOR_SHAPE


def test_the_run_layout_deploy_follows_is_the_pipelines():
    """`deploy.follow` finds a run's artifact without importing the pipeline: its names
    for run.json and the artifact directory must be the pipeline's."""
    from deploy import follow
    from pipeline.schema import RUN_FILE
    from pipeline.stages import stage

    assert (follow.RUN_FILE, follow.ARTIFACT_DIR) == (RUN_FILE, stage("export").directory)
