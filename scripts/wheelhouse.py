#!/usr/bin/env python3
"""Carry the training stack to a machine that reaches no package registry, in parts.

    # here, where pip reaches PyPI: wheels for the target's Python, packed and split
    python3 scripts/wheelhouse.py build OUT [--python 3.12] [--tensorflow cpu|gpu]
        [--part-mib 60] [--have FILE] [--requirement REQ ...]
    # there, with the parts copied into one folder: checked, joined, installed offline
    python3 scripts/wheelhouse.py install PARTS VENV [--system-site-packages]

`build` downloads binary wheels of this project's `train` extra (TensorFlow, Ray, tf2onnx,
...) and their dependencies for the target's Python and platform (x86-64 Linux), plus a
wheel of this project; leaves out what the target already has (`--have`: a file of
package names, one a line, such as `pip list --format freeze` there); packs them into
one tar, zstd-compressed, split into `wheelhouse.tar.zst.NNN` parts of at most
`--part-mib` MiB each (so each fits one transfer), with `wheelhouse.json` naming every
part's SHA-256 and the requirements to install.

`install` checks every part against `wheelhouse.json`, joins and unpacks them (zstd
through the `zstd` command or pyarrow, whichever the machine has), makes a virtualenv
and installs the requirements with `pip --no-index` from the unpacked wheels, then this
project without its dependencies. With `--system-site-packages` the virtualenv sees
the machine's own packages: what `--have` left out comes from there.

Only the standard library is needed on both sides, besides pip and a zstd decoder.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "wheelhouse.json"
PACK = "wheelhouse.tar.zst"
FORMAT = "vae-pipeline/wheelhouse/v1"
# Dependencies published only as source (pure Python): built into wheels here first.
SOURCE_ONLY = ("promise",)  # tensorflow-datasets needs it
# The x86-64 Linux wheel tags pip accepts only when named, newest first.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64"]


def normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def train_requirements(tensorflow: str) -> list[str]:
    """The project's `train` extra as pip requirements; `tensorflow` is "cpu" (the
    tensorflow-cpu wheel, half the size) or "gpu" (tensorflow, which loads CUDA)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    requirements = []
    for requirement in extras["train"]:
        if tensorflow == "cpu" and requirement.startswith("tensorflow>="):
            requirement = requirement.replace("tensorflow>=", "tensorflow-cpu>=", 1)
        requirements.append(requirement)
    return requirements


def pip_download(requirements: list[str], python: str, into: Path) -> None:
    """Wheels of `requirements` and everything they need, for `python` on x86-64 Linux;
    the SOURCE_ONLY ones are built here (pure Python: a wheel that runs anywhere)."""
    source_only = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(into)]
    subprocess.run(source_only + list(SOURCE_ONLY), check=True)
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(into)]
    command += ["--find-links", str(into)]
    command += ["--python-version", python, "--implementation", "cp", *platforms, *requirements]
    subprocess.run(command, check=True)


def project_wheel(into: Path) -> Path:
    """A wheel of this project (no dependencies: they come as wheels of their own)."""
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(into), str(ROOT)]
    subprocess.run(command, check=True)
    return next(into.glob("vae_pipeline-*.whl"))


def wheel_name(path: Path) -> str:
    return normalize(path.name.split("-", 1)[0])


def read_names(path: str) -> set[str]:
    """Package names, one a line (`pip list --format freeze` output works: `name==version`)."""
    lines = Path(path).read_text().splitlines()
    return {normalize(line.split("==")[0].strip()) for line in lines if line.strip() and not line.startswith("#")}


def drop_present(wheels: Path, have: set[str]) -> list[str]:
    """Delete the wheels of packages the target already has; returns their names."""
    dropped = []
    for path in sorted(wheels.glob("*.whl")):
        if wheel_name(path) in have:
            dropped.append(path.name)
            path.unlink()
    return dropped


def compress(data: bytes, level: int) -> bytes:
    """zstd at `level` through the `zstd` command (the build side has it: Debian's zstd)."""
    command = ["zstd", f"-{level}", "-T0", "-q", "-c"]
    return subprocess.run(command, input=data, capture_output=True, check=True).stdout


def decompress(stream):
    """A readable stream of the joined parts' tar: through the `zstd` command where there
    is one (into a temporary file, which tarfile then reads), else pyarrow's zstd codec."""
    if shutil.which("zstd"):
        out = tempfile.TemporaryFile()
        with subprocess.Popen(["zstd", "-d", "-q", "-c"], stdin=subprocess.PIPE, stdout=out) as process:
            shutil.copyfileobj(stream, process.stdin, 1 << 20)
            process.stdin.close()
        if process.returncode:
            raise SystemExit(f"wheelhouse: zstd could not decompress the parts (exit {process.returncode})")
        out.seek(0)
        return out
    import pyarrow

    return pyarrow.CompressedInputStream(pyarrow.PythonFile(stream, mode="r"), "zstd")


def pack(wheels: Path, out: Path, part_bytes: int, level: int) -> list[dict]:
    """tar + zstd of `wheels`, split into parts of at most `part_bytes`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in sorted(wheels.glob("*.whl")):
            archive.add(path, arcname=f"wheels/{path.name}")
    packed = compress(buffer.getvalue(), level)
    parts = []
    for index, start in enumerate(range(0, len(packed), part_bytes)):
        chunk = packed[start : start + part_bytes]
        name = f"{PACK}.{index:03d}"
        (out / name).write_bytes(chunk)
        parts.append({"name": name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    return parts


def build(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"wheelhouse: {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    requirements = args.requirement or train_requirements(args.tensorflow)
    have = read_names(args.have) if args.have else set()
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        wheels = Path(tmp)
        pip_download(requirements, args.python, wheels)
        project = project_wheel(wheels)
        dropped = drop_present(wheels, have - {"vae-pipeline"})
        carried = sorted(path.name for path in wheels.glob("*.whl"))
        parts = pack(wheels, out, args.part_mib << 20, args.level)
    manifest = {
        "format": FORMAT,
        "python": args.python,
        "requirements": requirements,
        "project_wheel": project.name,
        "wheels": carried,
        "left_out_as_present": dropped,
        "parts": parts,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(part["bytes"] for part in parts) / (1 << 20)
    print(f"wheelhouse: {len(carried)} wheels in {len(parts)} parts, {size:.1f} MiB, in {out}")


def read_parts(folder: Path) -> tuple[dict, list[Path]]:
    """The manifest and its parts in order, each checked against its SHA-256."""
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise SystemExit(f"wheelhouse: {folder / MANIFEST} is not a wheelhouse manifest")
    paths = []
    for part in manifest["parts"]:
        path = folder / part["name"]
        if not path.is_file():
            raise SystemExit(f"wheelhouse: {path} is missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != part["sha256"]:
            raise SystemExit(f"wheelhouse: {path} does not match its SHA-256 (damaged or cut off); copy it again")
        paths.append(path)
    return manifest, paths


class Joined(io.RawIOBase):
    """The parts read back to back as one stream."""

    def __init__(self, paths: list[Path]):
        self.handles = [open(path, "rb") for path in paths]  # noqa: SIM115 - closed in close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.handles:
            count = self.handles[0].readinto(buffer)
            if count:
                return count
            self.handles.pop(0).close()
        return 0

    def close(self) -> None:
        for handle in self.handles:
            handle.close()
        super().close()


def install(args: argparse.Namespace) -> None:
    folder, venv = Path(args.parts), Path(args.venv)
    manifest, paths = read_parts(folder)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        with Joined(paths) as joined, decompress(io.BufferedReader(joined)) as tar_stream:
            with tarfile.open(fileobj=tar_stream, mode="r|") as archive:
                archive.extractall(tmp, filter="data")
        wheels = Path(tmp) / "wheels"
        make_venv = [sys.executable, "-m", "venv", str(venv)]
        subprocess.run(make_venv + (["--system-site-packages"] if args.system_site_packages else []), check=True)
        pip = [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--find-links",
            str(wheels),
        ]
        subprocess.run(pip + manifest["requirements"], check=True)
        subprocess.run(pip + ["--no-deps", str(wheels / manifest["project_wheel"])], check=True)
    print(f"wheelhouse: installed {len(manifest['wheels'])} wheels into {venv}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="wheelhouse.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="download, pack and split the wheels")
    p.add_argument("out", help="a new or empty folder for the parts and wheelhouse.json")
    p.add_argument("--python", default="3.12", help="the target's Python version (default 3.12)")
    p.add_argument("--tensorflow", choices=("cpu", "gpu"), default="cpu", help="tensorflow-cpu or tensorflow")
    p.add_argument("--part-mib", type=int, default=60, help="largest part, MiB (default 60)")
    p.add_argument("--level", type=int, default=19, help="zstd level (default 19)")
    p.add_argument("--have", help="file of package names the target has (left out)")
    p.add_argument("--requirement", action="append", help="carry these instead of the train extra (repeatable)")
    p.set_defaults(func=build)
    p = sub.add_parser("install", help="check, join, unpack and install into a new virtualenv")
    p.add_argument("parts", help="the folder holding wheelhouse.json and its parts")
    p.add_argument("venv", help="the virtualenv to make")
    p.add_argument("--system-site-packages", action="store_true", help="let the virtualenv see the machine's packages")
    p.set_defaults(func=install)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
