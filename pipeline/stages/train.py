"""Train stage driver: builds the Ray Train `TensorflowTrainer` and writes TRAIN_DIR.

Output contract (TRAIN_DIR):
    model/vae.keras, model/model.json     the final model (Keras native format), for evaluate and export
    metrics.jsonl                         one JSON object per epoch
    tensorboard/                          the same metrics as TensorBoard events
    ray/                                  Ray Train storage: checkpoints per epoch
    config.json                           the resolved config
    train.json                            the run summary, written last (completeness marker)
TRAIN_DIR must be new, empty or an earlier training output (see pipeline.outputs).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, TrainConfig
from pipeline.data.dataset import check_dataset, with_dataset_section
from pipeline.errors import PipelineError, find_user_error, last_line
from pipeline.files import write_json, write_text
from pipeline.outputs import check_output, claimed_output
from pipeline.schema import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_DIR,
    RAY_STORAGE_DIR,
    TENSORBOARD_DIR,
    TRAIN_SUMMARY_FILE,
)
from pipeline.stages import StageRun
from pipeline.storage import RETRY_ENV, is_uri, join, ray_train_storage, retry_budget, with_retries
from pipeline.training.model_store import (
    check_checkpoint,
    check_model_dir,
    find_latest_checkpoint,
    read_checkpoint_info,
    write_model_dir,
)
from pipeline.training.worker_context import STOP_EVENTS

log = logging.getLogger(__name__)

RUN_NAME_PREFIX = "vae"
# oneDNN's kernels: on unless the environment says otherwise (docs/configuration.md).
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
# The driver blocks on the progress queue; the fit thread's FIT_DONE ends the wait, and
# the timeout only bounds how long a lost queue goes unnoticed. Each wait is an actor
# call, so a short poll would keep Ray busy beside the workers.
PROGRESS_WAIT_S = 10.0
FIT_DONE = {"event": "done"}
# What the train stage writes in TRAIN_DIR; anything else there is not its own.
TRAIN_OUTPUTS = [CONFIG_FILE, METRICS_FILE, TRAIN_SUMMARY_FILE, MODEL_DIR, RAY_STORAGE_DIR, TENSORBOARD_DIR]


@dataclass(frozen=True)
class TrainResult:
    out: Path
    summary: dict[str, Any]


def storage_location(config: Config, out: Path) -> str:
    """Ray Train's storage_path: the configured one (path or URI) or TRAIN_DIR/ray."""
    return config.train.storage_path or str((Path(out) / RAY_STORAGE_DIR).resolve())


def check_batch_fits(train: TrainConfig, train_rows: int) -> None:
    """Every worker must get at least one full batch an epoch, or training does nothing."""
    per_worker_rows = train_rows // train.num_workers
    per_worker_batch = train.worker_batch
    if per_worker_rows < per_worker_batch:
        raise PipelineError(
            f"train.batch_size {train.batch_size} does not fit the training split: {train_rows} rows over "
            f"{train.num_workers} worker{'s' if train.num_workers != 1 else ''} is {per_worker_rows}"
            f"{' each' if train.num_workers != 1 else ''}, less than one batch of {per_worker_batch}"
        )


def train(
    config: Config,
    data_dir: Path,
    out: Path,
    resume: bool = False,
    verbose: bool = False,
    parquet: str | None = None,
    epoch_hook: Callable[[int, int, int, str], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Run data-parallel training; returns when TRAIN_DIR/model/ and train.json are written.

    Ray Data reads the Parquet from `parquet` (a directory or URI holding the same
    dataset, for clusters whose nodes cannot see `data_dir`), else from `data_dir`.

    The dataset is checked against its manifest (content hash included) and the batch
    against the split before Ray starts. Training that diverges, ends early or leaves
    non-finite weights raises PipelineError and writes no model. `epoch_hook`, when
    given, runs in every worker at the start of every epoch (see
    pipeline.training.worker.train_func): tests inject faults with it. `on_epoch`, when
    given, gets each epoch's metrics at this driver as they arrive (experiment tracking).
    """
    data_dir, out = Path(data_dir), Path(out)
    manifest = check_dataset(data_dir, full=True)
    config = with_dataset_section(config, manifest, data_dir)
    check_batch_fits(config.train, manifest["rows"]["train"])
    check_output(out, "train")
    storage = storage_location(config, out)
    resume_from = checkpoint_to_resume(storage) if resume else None
    from pipeline.cluster import connection as ray_cluster

    workers = config.train.num_workers
    ray_cluster.connect(config.ray.address, min_cpus=workers * config.train.cpus_per_worker + 1, verbose=verbose)

    def resumable() -> bool:  # a store is not listed again: it may be what failed
        return is_uri(storage) or find_latest_checkpoint(storage) is not None

    # A failure leaves nothing behind unless there is a checkpoint to resume from.
    with claimed_output(out, "train", TRAIN_OUTPUTS, keep_on_failure=resumable) as out:
        write_json(out / CONFIG_FILE, config.to_dict())
        (out / TRAIN_SUMMARY_FILE).unlink(missing_ok=True)  # not complete until rewritten
        started = time.time()
        parquet = parquet or str(data_dir.resolve())
        plan = FitPlan(config, parquet, manifest, storage, resume_from, out, verbose, epoch_hook, on_epoch)
        result, events = fit(plan)
        history = write_final_model(plan, result.checkpoint)
        summary = {
            "status": "complete",
            "epochs": len(history),
            "final_metrics": history[-1],
            "wall_time_s": time.time() - started,
            "worker_group_starts": [e["epoch"] for e in events if e["event"] == "start"],
            "worker_group_start_times": [e["time"] for e in events if e["event"] == "start"],
            "resumed_from": resume_from,
            "checkpoint": result.checkpoint.path,
            "storage_path": storage,
            "data_sha256": manifest["content_sha256"],
            "num_workers": workers,
            "groups_per_worker": config.train.groups,
            "onednn": next((e["onednn"] for e in reversed(events) if e["event"] == "start"), None),
        }
        write_json(out / TRAIN_SUMMARY_FILE, summary)
    return TrainResult(out, summary)


def checkpoint_to_resume(storage: str) -> str:
    """`--resume`: the latest checkpoint under `storage`, checked when it is on this disk."""
    resume_from = find_latest_checkpoint(storage)
    if resume_from is None:
        raise PipelineError(f"--resume: no checkpoint found under {storage}")
    if "://" not in resume_from:
        check_checkpoint(Path(resume_from))
    return resume_from


def write_final_model(plan: FitPlan, checkpoint) -> list[dict[str, Any]]:
    """TRAIN_DIR/model/ and metrics.jsonl from the run's last checkpoint, once its history
    is whole and finite; returns the history."""
    if checkpoint is None:
        raise PipelineError("training ended without a checkpoint")
    config = plan.config
    with tempfile.TemporaryDirectory(prefix="vae-final-") as staging:
        # Copied first (within the storage retry limit, as every read from a store is).
        directory = with_retries(lambda: checkpoint.to_directory(staging), f"{checkpoint.path}: cannot read")
        info = read_checkpoint_info(Path(directory))
        history = info["history"]
        check_history(history, config.train.epochs)
        write_text(plan.out / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in history))
        model_info = {
            "architecture": info["architecture"],
            "seed": config.seed,
            "config": config.to_dict(),
            "epochs": len(history),
            "final_metrics": history[-1],
            "data_sha256": plan.manifest["content_sha256"],
        }
        write_model_dir(plan.out, Path(directory), model_info)
    return history


def check_history(history: list[dict[str, Any]], epochs: int) -> None:
    """Training is complete only with every epoch's metrics, all finite."""
    if len(history) != epochs:
        raise PipelineError(f"training stopped after {len(history)} of {epochs} epochs")
    for row in history:
        bad = [key for key, value in row.items() if isinstance(value, float) and not math.isfinite(value)]
        if bad:
            raise PipelineError(f"training diverged: non-finite {bad[0]} in epoch {row['epoch'] + 1}")


@dataclass(frozen=True)
class FitPlan:
    """Everything one `trainer.fit()` needs from the stage driver."""

    config: Config
    parquet: str  # the dataset's directory or URI
    manifest: dict[str, Any]
    storage: str  # Ray Train's storage path or URI
    resume_from: str | None  # a checkpoint to start from
    out: Path  # TRAIN_DIR
    verbose: bool
    epoch_hook: Callable[[int, int, int, str], None] | None = None
    on_epoch: Callable[[dict[str, Any]], None] | None = None


def fit(plan: FitPlan):
    """Run the TensorflowTrainer in a thread while this thread logs its progress events."""
    import ray.data
    from ray.util.queue import Queue

    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = plan.verbose
    # Blocks in file order, not in the order their read tasks finish, so the seeded
    # shuffles give the same epochs on every run.
    data_context.execution_options.preserve_order = True
    # The training split is small: read it once into the object store, so epochs
    # stream from memory instead of re-reading Parquet.
    dataset = ray.data.read_parquet(join(plan.parquet, "train"), columns=["image"]).materialize()
    progress = Queue(actor_options=driver_node_actor_options())
    trainer = make_trainer(plan, dataset, progress)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc
        finally:
            try:
                progress.put(FIT_DONE)  # wakes the wait below at once
            except Exception:  # Ray gone: the wait's timeout notices
                pass

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    events = follow_progress(plan, thread, progress)
    if "error" in outcome:
        raise training_error(outcome["error"]) from outcome["error"]
    stopped = [event["message"] for event in events if event["event"] in STOP_EVENTS]
    if stopped:
        raise PipelineError(stopped[0])
    return outcome["result"], events


def make_trainer(plan: FitPlan, dataset, progress):
    """The TensorflowTrainer running `train_func` on `plan.config`'s workers."""
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from pipeline.training.worker import train_func

    train = plan.config.train
    run_name = f"{RUN_NAME_PREFIX}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path, storage_filesystem = ray_train_storage(plan.storage)
    return TensorflowTrainer(
        train_func,
        train_loop_config={
            "config": plan.config.to_dict(),
            "train_rows": plan.manifest["rows"]["train"],
            "progress": progress,
            # Ray Train V2 dropped `resume_from_checkpoint`: the loop loads it itself.
            "resume_from": plan.resume_from,
            "run_storage": join(plan.storage, run_name),  # where this run's checkpoints go
            "epoch_hook": plan.epoch_hook,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            # Set for the worker processes themselves, on any cluster: oneDNN's switch is
            # read when a worker first imports TensorFlow (Ray Train's backend does, before
            # `train_func`); the storage limit bounds the workers' checkpoint uploads.
            worker_runtime_env={
                "env_vars": {ONEDNN_ENV: os.environ.get(ONEDNN_ENV, "1"), RETRY_ENV: str(retry_budget())}
            },
        ),
        datasets={"train": dataset},
    )


def follow_progress(plan: FitPlan, thread: threading.Thread, progress) -> list[dict[str, Any]]:
    """Log the workers' events until the fit thread ends; returns them."""
    import ray

    events: list[dict[str, Any]] = []
    with ProgressLog(plan.out, plan.config.train.epochs, plan.resume_from is not None, plan.on_epoch) as logger:
        while thread.is_alive() or not progress.empty():
            try:
                event = progress.get(timeout=PROGRESS_WAIT_S)
            except queue.Empty:  # ray.util.queue.Empty subclasses it
                continue
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                # Its node died: training goes on (Ray Train restarts its workers); only the
                # per-epoch lines stop. The model and summary come from the checkpoint.
                log.warning("train: lost the progress channel (%s); waiting for training to end", last_line(exc))
                break
            if event == FIT_DONE:
                break
            events.append(event)
            logger.handle(event)
        thread.join()
    return events


def driver_node_actor_options() -> dict[str, Any]:
    """The progress queue's actor on this driver's node, holding no CPU: a worker node
    that dies (and with it, anything placed there) must not take the driver's progress
    channel with it. A head started with --num-cpus 0 still takes it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


def training_error(error: BaseException) -> PipelineError:
    """A one-line PipelineError for a failed `trainer.fit()`: a user error raised in a
    worker keeps its own message; anything else gives the last line of Ray's report."""
    log.debug("training failed", exc_info=error)
    user = find_user_error(error)
    if user is not None:
        return PipelineError(str(user))
    return PipelineError(f"training failed: {last_line(error)} (run with --verbose for the traceback)")


class ProgressLog:
    """Prints one line per epoch and appends it to metrics.jsonl and TensorBoard."""

    def __init__(self, out: Path, epochs: int, append: bool, on_epoch: Callable[[dict[str, Any]], None] | None):
        self.out, self.epochs, self.append, self.on_epoch = Path(out), epochs, append, on_epoch

    def __enter__(self) -> ProgressLog:
        self.jsonl = open(self.out / METRICS_FILE, "a" if self.append else "w", encoding="utf-8")
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(self.out / TENSORBOARD_DIR))
        return self

    def handle(self, event: dict[str, Any]) -> None:
        if event["event"] in STOP_EVENTS:
            return  # the driver raises it once training has stopped
        if event["event"] == "start":
            verb = "resuming at" if event["epoch"] else "starting at"
            log.info(
                "train: %d worker%s x %d group%s %s epoch %d (oneDNN kernels %s)",
                event["workers"],
                "s" if event["workers"] != 1 else "",
                event["groups"],
                "s" if event["groups"] != 1 else "",
                verb,
                event["epoch"] + 1,
                {True: "on", False: "off"}.get(event["onednn"], "unknown"),
            )
            return
        epoch = event["epoch"]
        metrics = {k: v for k, v in event.items() if k != "event"}
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        for name in ("loss", "reconstruction", "kl", "images_per_s", "epoch_time_s", "learning_rate", "free_bits"):
            self.writer.add_scalar(f"train/{name}", metrics[name], global_step=epoch + 1)
        self.writer.flush()
        log.info(
            "train: epoch %d/%d  loss %.2f  recon %.2f  kl %.2f nats  %.0f img/s  %.1f s%s",
            epoch + 1,
            self.epochs,
            metrics["loss"],
            metrics["reconstruction"],
            metrics["kl"],
            metrics["images_per_s"],
            metrics["epoch_time_s"],
            "" if metrics["replicas_agree"] else "  REPLICAS DIVERGED",
        )
        if self.on_epoch is not None:
            self.on_epoch(metrics)

    def __exit__(self, *exc_info) -> None:
        self.jsonl.close()
        self.writer.close()


def run_in(run: StageRun) -> None:
    train(
        run.config,
        run.directory("ingest"),
        run.directory("train"),
        resume=run.resume,
        verbose=run.verbose,
        parquet=run.parquet,
        on_epoch=run.on_epoch,
    )


def check_done(directory: Path) -> None:
    """The model still matches its recorded hash and architecture, and the run's summary,
    written last, is there."""
    check_model_dir(directory)
    if not (directory / TRAIN_SUMMARY_FILE).is_file():
        raise PipelineError(f"{directory}: no {TRAIN_SUMMARY_FILE}")


def can_resume(directory: Path, config: Config) -> bool:
    """An interrupted train stage whose storage holds a checkpoint continues from it."""
    return find_latest_checkpoint(storage_location(config, directory)) is not None
