"""The `vae-pipeline` command line: builds a Config and calls one stage function.

User errors (PipelineError) print one line and exit 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline import __version__
from pipeline.config import Config, load_config
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML or YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set train.epochs=3 (repeatable)",
    )


def _flag_overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    """Turn the common flags that were given into `--set` overrides (flags win)."""
    out = []
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is not None and value is not False:
            out.append(f"{key}={value if not isinstance(value, bool) else 'true'}")
    return out


def build_config(args: argparse.Namespace, flags: dict[str, str]) -> Config:
    """Defaults <- environment <- --config file <- --set <- flags."""
    base = {"train": {"address": os.environ["RAY_ADDRESS"]}} if os.environ.get("RAY_ADDRESS") else {}
    return load_config(args.config, [*args.overrides, *_flag_overrides(args, flags)], base=base)


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipeline.ingest import ingest

    config = build_config(args, {"source": "data.source", "limit": "data.limit"})
    result = ingest(config, args.out, force=args.force)
    rows = result.manifest["rows"]
    verb = "unchanged" if result.skipped else "written"
    print(f"dataset {verb}: {result.out} ({rows['train']} train / {rows['test']} test rows)")
    return 0


TRAIN_FLAGS = {
    "epochs": "train.epochs",
    "num_workers": "train.num_workers",
    "cpus_per_worker": "train.cpus_per_worker",
    "use_gpu": "train.use_gpu",
    "address": "train.address",
}


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.train import train

    config = build_config(args, TRAIN_FLAGS)
    result = train(config, args.data, args.out, resume=args.resume, verbose=args.verbose)
    final = result.summary["final_metrics"]
    print(
        f"model written: {result.out / 'model'} ({result.summary['epochs']} epochs, "
        f"final train loss {final['loss']:.2f} nats)"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate

    config = build_config(args, {"iwae_k": "evaluate.iwae_k", "address": "train.address"})
    result = evaluate(config, args.data, args.model, args.out, verbose=args.verbose)
    test = result.report["test"]
    print(
        f"report written: {result.out / 'report.html'} (test -ELBO {test['neg_elbo']:.2f} nats, "
        f"IWAE k={test['iwae_k']} {test['neg_iwae']:.2f} nats, "
        f"5-NN accuracy {result.report['clustering']['knn_accuracy']:.3f})"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import export

    config = build_config(args, {})
    result = export(config, args.model, args.out, data_dir=args.data, eval_dir=args.report)
    worst = max(result.card["verification"]["max_abs_difference"].values())
    print(f"artifact written: {result.out} (onnxruntime vs Keras max difference {worst:.1e})")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vae-pipeline",
        description="Train a convolutional VAE on Fashion-MNIST with Ray Train and export it to ONNX.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="Fashion-MNIST -> validated Parquet dataset + manifest")
    p.add_argument(
        "--source",
        help="auto (default: local IDX files if found, else tfds), tfds, or idx:DIR",
    )
    p.add_argument("--out", type=Path, required=True, help="output dataset directory")
    p.add_argument("--limit", type=int, help="use only the first N examples of each split")
    p.add_argument("--force", action="store_true", help="rebuild even if the data is unchanged")
    _add_config_args(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("train", help="data-parallel VAE training with Ray Train")
    p.add_argument("--data", type=Path, required=True, help="ingested dataset directory")
    p.add_argument("--out", type=Path, required=True, help="training output directory")
    p.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (train.num_workers)")
    p.add_argument("--cpus-per-worker", type=int, help="CPUs per worker (train.cpus_per_worker)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (train.use_gpu)")
    p.add_argument(
        "--address",
        help="existing Ray cluster (host:port or ray://host:10001; default: $RAY_ADDRESS, else a local Ray)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test-set ELBO, IWAE bound, latent clustering, report")
    p.add_argument("--data", type=Path, required=True, help="ingested dataset directory")
    p.add_argument("--model", type=Path, required=True, help="training output directory (TRAIN_DIR)")
    p.add_argument("--out", type=Path, required=True, help="evaluation output directory")
    p.add_argument("--iwae-k", type=int, help="importance samples for the IWAE bound (evaluate.iwae_k)")
    p.add_argument("--address", help="existing Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    _add_config_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="decoder and encoder to ONNX, verified against Keras")
    p.add_argument("--model", type=Path, required=True, help="training output directory (TRAIN_DIR)")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    p.add_argument("--data", type=Path, help="dataset directory: verify the encoder on its test images")
    p.add_argument("--report", type=Path, help="evaluation directory: put its metrics in the model card")
    _add_config_args(p)
    p.set_defaults(func=cmd_export)
    return parser


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    configure_logging(args.verbose)
    # TensorFlow's C++ start-up chatter (CPU features, missing CUDA) is not for users.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if args.verbose else "3")
    try:
        return args.func(args)
    except PipelineError as exc:
        print(f"vae-pipeline: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vae-pipeline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
