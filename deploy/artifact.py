"""Checking an artifact directory before anything in it is loaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHECKSUMS_FILE = "SHA256SUMS"
DECODER_FILE = "decoder.onnx"
ENCODER_FILE = "encoder.onnx"
MODEL_CARD_JSON = "model_card.json"  # the card's facts (latent size, metrics, versions)
IMAGE_SHAPE = (28, 28, 1)  # one image, as both ONNX files take or give it


class ArtifactError(ValueError):
    """The artifact directory is missing files or a file does not match SHA256SUMS."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checksums(directory: Path) -> dict[str, str]:
    path = Path(directory) / CHECKSUMS_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {CHECKSUMS_FILE}; not an exported artifact")
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ArtifactError(f"{path}: line {number} is not '<sha256>  <file>'")
        sums[name.strip()] = digest
    return sums


def verify_checksums(directory: Path, required: tuple[str, ...] = (DECODER_FILE,)) -> dict[str, str]:
    """Check every listed file's SHA-256; raise ArtifactError on any mismatch or absence."""
    directory = Path(directory)
    sums = read_checksums(directory)
    for name in required:
        if name not in sums:
            raise ArtifactError(f"{directory}: {name} is not listed in {CHECKSUMS_FILE}")
    for name, expected in sums.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in {CHECKSUMS_FILE} but missing")
        if sha256_file(path) != expected:
            raise ArtifactError(f"{path}: SHA-256 does not match {CHECKSUMS_FILE} (modified or corrupt)")
    return sums
