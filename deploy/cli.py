"""`vae-generate`: sample a PNG grid of images from an exported artifact."""

from __future__ import annotations

import argparse
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

from deploy.artifact import ArtifactError
from deploy.generator import Generator


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode a (H, W) uint8 greyscale array as a PNG (standard library only)."""
    height, width = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def grid(images: np.ndarray, columns: int) -> np.ndarray:
    """(N, 28, 28, 1) in [0, 1] -> one uint8 mosaic, ink dark on white, 2-pixel gutters."""
    count = len(images)
    rows = -(-count // columns)
    cell = 30
    canvas = np.full((rows * cell, columns * cell), 255, np.uint8)
    for index in range(count):
        r, c = divmod(index, columns)
        tile = (255 - np.round(images[index, :, :, 0] * 255)).astype(np.uint8)
        canvas[r * cell + 1 : r * cell + 29, c * cell + 1 : c * cell + 29] = tile
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vae-generate", description="Sample images from an exported VAE.")
    parser.add_argument("--model", type=Path, required=True, help="artifact directory (export stage output)")
    parser.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--temperature", type=float, default=1.0, help="prior scale (default 1.0)")
    parser.add_argument("--providers", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        generator = Generator(args.model, providers=args.providers)
        images = generator.sample(args.n, seed=args.seed, temperature=args.temperature)
    except (ArtifactError, ValueError, OSError) as exc:
        print(f"vae-generate: error: {exc}", file=sys.stderr)
        return 2
    columns = int(np.ceil(np.sqrt(args.n)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_bytes(png_bytes(grid(images, columns)))
    tmp.replace(args.out)
    print(f"wrote {args.out} ({args.n} images, providers {generator.providers[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
