"""Artifacts' decoders against the first one's, each timed alone in a process of its own.

    .venv/bin/python benchmarks/decode_alone.py BASELINE/artifact OTHER/artifact [...] [--rounds 5]

For each round, one process per artifact, one after another: `Generator(ART,
providers="cpu").decode` of one latent (p50 of 1,000 calls) and of 256 (images/s, median of
40 calls). No TensorFlow: what an application embedding the artifact pays. Prints every
round, then each artifact's median over the rounds as a ratio to the first artifact's
(measured in the same run). A process that lands in one of the VM's slow spells shows as
a round out of line with the others.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def measure(artifact: str) -> dict[str, float]:
    """This process's share: batch-1 p50 (ms) and batch-256 images/s of one artifact."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.inference import latencies
    from deploy import Generator

    generator = Generator(artifact, providers="cpu")
    rng = np.random.default_rng(0)
    result = {}
    for batch, calls in ((1, 1000), (256, 40)):
        z = rng.standard_normal((batch, generator.latent_dim)).astype(np.float32)
        times = latencies({"decode": generator.decode}, z, calls, block=calls)["decode"]
        result[str(batch)] = float(np.median(times))
    return {"batch1_ms": result["1"] * 1e3, "batch256_images_s": 256 / result["256"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", help="artifact directories; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one process's share
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.artifacts[0])))
        return
    runs: dict[str, list[dict[str, float]]] = {a: [] for a in args.artifacts}
    for round_ in range(1, args.rounds + 1):
        for artifact in args.artifacts:
            done = subprocess.run([sys.executable, __file__, "--measure", artifact], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{artifact}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
            runs[artifact].append(json.loads(done.stdout.splitlines()[-1]))
            last = runs[artifact][-1]
            print(
                f"round {round_}: {artifact}: batch 1 {last['batch1_ms']:.3f} ms, "
                f"batch 256 {last['batch256_images_s']:,.0f} images/s",
                flush=True,
            )
    median = {a: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for a, rs in runs.items()}
    base = median[args.artifacts[0]]
    print(f"median of {args.rounds} rounds (ratio to {args.artifacts[0]}):")
    for artifact, m in median.items():
        print(
            f"  {artifact}: batch 1 {m['batch1_ms']:.3f} ms ({base['batch1_ms'] / m['batch1_ms']:.2f}x the speed), "
            f"batch 256 {m['batch256_images_s']:,.0f} images/s "
            f"({m['batch256_images_s'] / base['batch256_images_s']:.2f}x)"
        )


if __name__ == "__main__":
    main()
