"""The `vae-pipeline` command line: builds a Config and calls one stage function.

User errors (PipelineError) print one line and exit 2 (with `--verbose`, the traceback
first); a run that completes but fails the gate, one line and exit 3; bugs keep their
traceback (exit 1); an interrupt exits 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from pipeline import __version__
from pipeline.config import Config, load_config
from pipeline.errors import PipelineError
from pipeline.schema import CLUSTER_RUNS_ROOT

log = logging.getLogger("pipeline")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors (a missing or misspelt option, a bad value) as the one line and exit
    code 2 of every other user error, with where to look instead of the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog.split()[0]}: error: {message} (see {self.prog} --help)\n")


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


DATA_HELP = "ingested dataset directory"
MODEL_HELP = "training output directory (TRAIN_DIR)"


def _add_paths(parser: argparse.ArgumentParser, required: bool = True, **helps: str) -> None:
    """`--NAME PATH` options, one per keyword: its help text."""
    for name, text in helps.items():
        parser.add_argument(f"--{name}", type=Path, required=required, help=text)


def _flag_overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    """Turn the common flags that were given into `--set` overrides (flags win)."""
    out = []
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is not None and value is not False:
            out.append(f"{key}={value if not isinstance(value, bool) else 'true'}")
    return out


def import_tensorflow(args: argparse.Namespace) -> None:
    """Load TensorFlow now, its start-up chatter silenced unless --verbose."""
    if not args.verbose:
        from pipeline.quiet import import_tensorflow_quietly

        import_tensorflow_quietly()


def build_config(args: argparse.Namespace, flags: dict[str, str]) -> Config:
    """Defaults <- environment <- --config file <- --set <- flags. Validated here, before
    any stage module (and with it TensorFlow, 7-11 s) is imported: a bad value fails at once."""
    base = {"ray": {"address": os.environ["RAY_ADDRESS"]}} if os.environ.get("RAY_ADDRESS") else {}
    config = load_config(args.config, [*args.overrides, *_flag_overrides(args, flags)], base=base)
    if args.command in ("train", "evaluate", "export", "run"):
        import_tensorflow(args)
    return config


def cmd_ingest(args: argparse.Namespace) -> int:
    config = build_config(args, {"source": "data.source", "limit": "data.limit"})
    from pipeline.stages.ingest import ingest

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
    "address": "ray.address",
}


def cmd_train(args: argparse.Namespace) -> int:
    config = build_config(args, TRAIN_FLAGS)
    from pipeline.stages.train import train

    result = train(config, args.data, args.out, resume=args.resume, verbose=args.verbose)
    final = result.summary["final_metrics"]
    print(
        f"model written: {result.out / 'model'} ({result.summary['epochs']} epochs, "
        f"final train loss {final['loss']:.2f} nats)"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    config = build_config(args, {"iwae_k": "evaluate.iwae_k", "address": "ray.address"})
    from pipeline.stages.evaluate import evaluate

    result = evaluate(config, args.data, args.model, args.out, verbose=args.verbose)
    test = result.report["test"]
    print(
        f"report written: {result.out / 'report.html'} (test -ELBO {test['neg_elbo']:.2f} nats, "
        f"IWAE k={test['iwae_k']} {test['neg_iwae']:.2f} nats, "
        f"5-NN accuracy {result.report['clustering']['knn_accuracy']:.3f})"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    config = build_config(args, {})
    from pipeline.stages.export import export

    result = export(config, args.model, args.out, data_dir=args.data, eval_dir=args.report)
    worst = max(result.card["verification"]["max_abs_difference"].values())
    print(f"artifact written: {result.out} (onnxruntime vs Keras max difference {worst:.1e})")
    return 0


def cmd_upgrade_model(args: argparse.Namespace) -> int:
    from pipeline.training.model_store import upgrade_model_dir

    import_tensorflow(args)
    directory = upgrade_model_dir(args.model)
    print(f"model upgraded: {directory} (vae.keras)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = build_config(args, {})
    from pipeline.runs.run import run_pipeline
    from pipeline.storage import is_uri

    def place(location: str | None) -> str | Path | None:
        return location if location is None or is_uri(location) else Path(location).expanduser()

    result = run_pipeline(config, place(args.runs_root), place(args.run_dir), force=args.force, verbose=args.verbose)
    print(f"run complete: {result.location}")
    print(f"artifact: {result.artifact_location}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from pipeline.runs.listing import format_rows, list_runs

    rows = list_runs(args.runs_root)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("\n".join(format_rows(rows)))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from pipeline.runs.pointers import resolve_run
    from pipeline.runs.promotion import promote

    location = resolve_run(args.run)
    replaced = promote(location)
    print(f"champion: {location} (was {replaced or 'none'})")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from pipeline.runs.fetch import fetch

    result = fetch(args.run, args.out.expanduser())
    print(f"artifact fetched: {result.out} ({len(result.files)} files verified against SHA256SUMS, from {result.run})")
    return 0


def default_dashboard() -> str:
    return os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"


def default_cluster_runs_root() -> str:
    """A configured object-store runs root ($VAE_PIPELINE_RUNS) reaches every node; a
    local one names this machine's disk, so the cluster gets its own default."""
    from pipeline.storage import is_uri

    configured = os.environ.get("VAE_PIPELINE_RUNS", "")
    return configured if is_uri(configured) else CLUSTER_RUNS_ROOT


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.runs import submit

    # The job runs on the cluster, so its own RAY_ADDRESS applies there, not ours.
    config = load_config(args.config, args.overrides)
    job = submit.submit(args.address, config, runs_root=args.runs_root, run_dir=args.run_dir)
    job_id = job.job_id
    # On stderr: with --no-wait, stdout is the job id alone.
    print(f"submit: the run will land in {job.run_location}{job.where}", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return 0
    log.info("submit: job %s submitted to %s; streaming its logs", job_id, args.address)
    final = submit.follow(args.address, job_id)
    print(f"job {job_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.runs import submit

    state = submit.status(args.address, args.job_id)
    print(state)
    return 0 if state in ("SUCCEEDED", "PENDING", "RUNNING") else 1


def cmd_logs(args: argparse.Namespace) -> int:
    from pipeline.runs import submit

    print(submit.logs(args.address, args.job_id), end="")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="vae-pipeline",
        allow_abbrev=False,
        description="Train a convolutional VAE on Fashion-MNIST with Ray Train and export it to ONNX.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_stage_commands(sub)
    _add_run_commands(sub)
    return parser


def _add_stage_commands(sub) -> None:
    """One command per stage: ingest, train, evaluate, export."""
    p = sub.add_parser("ingest", help="Fashion-MNIST -> validated Parquet dataset + manifest", allow_abbrev=False)
    p.add_argument(
        "--source",
        help="auto (default: local IDX files if found, else tfds), tfds, or idx:DIR",
    )
    p.add_argument("--out", type=Path, required=True, help="output dataset directory")
    p.add_argument("--limit", type=int, help="use only the first N examples of each split")
    p.add_argument("--force", action="store_true", help="rebuild even if the data is unchanged")
    _add_config_args(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("train", help="data-parallel VAE training with Ray Train", allow_abbrev=False)
    _add_paths(p, data=DATA_HELP, out="training output directory")
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

    p = sub.add_parser("evaluate", help="test-set ELBO, IWAE bound, latent clustering, report", allow_abbrev=False)
    _add_paths(p, data=DATA_HELP, model=MODEL_HELP, out="evaluation output directory")
    p.add_argument("--iwae-k", type=int, help="importance samples for the IWAE bound (evaluate.iwae_k)")
    p.add_argument("--address", help="existing Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    _add_config_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="decoder and encoder to ONNX, verified against Keras", allow_abbrev=False)
    _add_paths(p, model=MODEL_HELP, out="artifact directory to write")
    _add_paths(
        p,
        required=False,
        data="dataset directory: verify the encoder on its test images",
        report="evaluation directory: put its metrics in the model card",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_export)


def _add_run_commands(sub) -> None:
    """The commands around the stages: upgrade-model, run, submit, fetch, status, logs."""
    p = sub.add_parser(
        "upgrade-model", help="convert a TRAIN_DIR/model/ of an older version to vae.keras", allow_abbrev=False
    )
    p.add_argument("model", type=Path, help="training output directory (TRAIN_DIR)")
    p.set_defaults(func=cmd_upgrade_model)

    p = sub.add_parser("run", help="all stages in one run directory, cached per stage", allow_abbrev=False)
    p.add_argument("--run-dir", help="run (or continue) in this directory or object-store URI (s3://, gs://)")
    p.add_argument(
        "--runs-root",
        default=os.environ.get("VAE_PIPELINE_RUNS", "runs"),  # read once, here
        help="directory or object-store URI holding the runs, `latest` and `champion` "
        "(default: $VAE_PIPELINE_RUNS or ./runs)",
    )
    p.add_argument("--force", metavar="STAGE", help="rerun STAGE and every stage after it")
    _add_config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="submit `run` to a Ray cluster as a Ray Job", allow_abbrev=False)
    p.add_argument("--address", default=default_dashboard(), help="Ray dashboard, e.g. http://HEAD:8265")
    p.add_argument(
        "--runs-root",
        default=default_cluster_runs_root(),
        help="object-store URI (s3://, gs://) or a directory on the cluster "
        f"(default: $VAE_PIPELINE_RUNS if it is a URI, else {CLUSTER_RUNS_ROOT})",
    )
    p.add_argument("--run-dir", help="run location (default: a new one under --runs-root)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    _add_config_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("fetch", help="copy a finished run's artifact here and verify it", allow_abbrev=False)
    p.add_argument("run", help="run directory or URI, or RUNS/champion or RUNS/latest (e.g. s3://bucket/runs/champion)")
    p.add_argument(
        "--out", type=Path, required=True, help="artifact directory to write (new, empty, or an earlier fetch)"
    )
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("runs", help="list the runs under RUNS with their numbers and pointers", allow_abbrev=False)
    p.add_argument(
        "runs_root",
        nargs="?",
        default=os.environ.get("VAE_PIPELINE_RUNS", "runs"),
        help="directory or object-store URI (default: $VAE_PIPELINE_RUNS or ./runs)",
    )
    p.add_argument("--json", action="store_true", help="a JSON list instead of the table")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser(
        "promote", help="make a complete run the champion (a rollback, or over the gate)", allow_abbrev=False
    )
    p.add_argument("run", help="run directory or URI (in its runs root), e.g. runs/run-20261205-020000")
    p.set_defaults(func=cmd_promote)

    for name, func, text in (
        ("status", cmd_status, "a submitted job's status"),
        ("logs", cmd_logs, "a submitted job's logs"),
    ):
        p = sub.add_parser(name, help=text, allow_abbrev=False)
        p.add_argument("job_id")
        p.add_argument("--address", default=default_dashboard(), help="Ray dashboard, e.g. http://HEAD:8265")
        p.set_defaults(func=func)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if not verbose:  # converter and parser chatter
        for name in ("tf2onnx", "absl", "tensorflow"):
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    configure_logging(args.verbose)
    # TensorFlow's C++ start-up chatter (CPU features, missing CUDA) is not for users.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if args.verbose else "3")
    # oneDNN's kernels: 1.3x TensorFlow's own on a training step here, but TensorFlow turns
    # them on by default only on some CPUs (docs/benchmarks.md); TF_ENABLE_ONEDNN_OPTS=0 opts out.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    try:
        return args.func(args)
    except PipelineError as exc:
        if args.verbose:
            traceback.print_exception(exc, file=sys.stderr)
        print(f"vae-pipeline: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vae-pipeline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
