import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.schema import METRICS_FILE, MODEL_DIR, TRAIN_SUMMARY_FILE
from pipeline.stages.train import find_latest_checkpoint, train
from pipeline.training.model_store import read_keras_file
from tests.helpers import CrashOnce, poison_keras_file, single_error_line

TINY = ["model.preset=seed", "model.latent_dim=4", "train.batch_size=64"]


def history(out):
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if line.strip()]


def test_two_workers_lower_the_loss_and_keep_replicas_identical(trained_run):
    rows = history(trained_run.out)
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(row["replicas_agree"] for row in rows)
    assert all((row["workers"], row["groups"]) == (2, 1) for row in rows)
    assert all(np.isfinite(row["images_per_s"]) and row["images_per_s"] > 0 for row in rows)
    # The training-only terms (free bits, the contrastive term, on by default) stay out of the
    # reported loss: it is the negative ELBO.
    assert load_config().train.contrastive_weight > 0
    assert all(row["loss"] == pytest.approx(row["reconstruction"] + row["kl"], rel=1e-5) for row in rows)
    floors = [row["free_bits"] for row in rows]  # the default schedule, at the end of each epoch
    assert (
        load_config().train.free_bits
        > floors[0]
        > floors[1]
        > floors[2]
        == pytest.approx(load_config().train.free_bits_final)
    )


def test_free_bits_follow_the_learning_rates_cosine_to_their_final_value():
    from pipeline.training.schedules import free_bits_schedule

    steps_per_epoch = 10
    config = load_config(overrides=["train.epochs=2", "train.free_bits=0.6", "train.free_bits_final=0.1"])
    schedule = free_bits_schedule(config, steps_per_epoch)
    values = [float(schedule(step)) for step in (0, 5, 10, 15, 20, 30)]
    np.testing.assert_allclose(
        values, [0.6, 0.35 + 0.25 * np.cos(np.pi / 4), 0.35, 0.35 - 0.25 * np.cos(np.pi / 4), 0.1, 0.1], atol=1e-6
    )
    for constant in ("train.free_bits_final=none", "train.free_bits=0", "train.free_bits=0.3"):  # final 0.8 >= 0.3
        config = load_config(overrides=[constant])
        assert float(free_bits_schedule(config, steps_per_epoch)(7)) == config.train.free_bits


def test_free_bits_can_fall_in_fewer_epochs_and_then_stay_at_their_final_value():
    from pipeline.training.schedules import free_bits_schedule

    overrides = ["train.epochs=4", "train.free_bits=0.6", "train.free_bits_final=0.1"]
    schedule = free_bits_schedule(load_config(overrides=[*overrides, "train.free_bits_fall_epochs=2"]), 10)
    values = [float(schedule(step)) for step in (0, 10, 20, 25, 40)]
    np.testing.assert_allclose(values, [0.6, 0.35, 0.1, 0.1, 0.1], atol=1e-6)
    # more fall epochs than epochs: the fall takes the whole run, as without the setting
    longer = free_bits_schedule(load_config(overrides=[*overrides, "train.free_bits_fall_epochs=9"]), 10)
    whole = free_bits_schedule(load_config(overrides=overrides), 10)
    assert [float(longer(step)) for step in (10, 20, 30)] == [float(whole(step)) for step in (10, 20, 30)]
    assert float(whole(20)) == pytest.approx(0.35)


def test_a_checkpoint_per_epoch_kept_to_the_configured_number(trained_run):
    storage = trained_run.out / "ray"
    kept = sorted(p.name for p in storage.rglob("checkpoint_epoch_*") if p.is_dir())
    assert kept == ["checkpoint_epoch_0001", "checkpoint_epoch_0002"]  # num_to_keep=2 of 3
    info = json.loads((storage.rglob("checkpoint_epoch_0002").__next__() / "checkpoint.json").read_text())
    assert info["epoch"] == 2 and len(info["history"]) == 3
    assert find_latest_checkpoint(str(storage)).endswith("checkpoint_epoch_0002")


def test_final_model_and_summary_are_written(trained_run):
    out = trained_run.out
    assert (out / MODEL_DIR / "vae.keras").is_file()
    summary = json.loads((out / TRAIN_SUMMARY_FILE).read_text())
    assert summary["status"] == "complete" and summary["epochs"] == 3
    assert list((out / "tensorboard").iterdir())


def test_one_worker_trains_the_same_whatever_the_steps_per_execution(tmp_path, small_dataset, ray_local):
    # 16 steps an epoch: one step per call, and chunks of 3 with a 1-step remainder.
    runs = []
    for steps in (1, 3):
        config = load_config(
            overrides=[*TINY, "train.epochs=1", "train.num_workers=1", f"train.steps_per_execution={steps}"]
        )
        runs.append(train(config, small_dataset, tmp_path / f"run-{steps}").out)
    rows = history(runs[0])
    # The default layout: one worker, its batch in a group for each of its 2 CPUs, on oneDNN.
    assert [(row["workers"], row["groups"]) for row in rows] == [(1, 2)]
    assert json.loads((runs[0] / TRAIN_SUMMARY_FILE).read_text())["onednn"] is True
    assert [row["loss"] for row in history(runs[1])] == [row["loss"] for row in rows]
    one, three = (read_keras_file(run / MODEL_DIR / "vae.keras")[1] for run in runs)
    assert sorted(one) == sorted(three) and len(one) > 10
    assert all(np.array_equal(one[name], three[name]) for name in one)


def test_without_retries_a_crash_fails_the_stage_and_leaves_only_what_resumes(tmp_path, small_dataset, ray_local):
    """Before any checkpoint: nothing is left (a new path is removed, an empty directory
    emptied). After one: the output stays, for `--resume`."""
    config = load_config(overrides=[*TINY, "train.epochs=2", "train.max_failures=0"])
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        with pytest.raises(PipelineError, match="training failed"):
            train(config, small_dataset, out, epoch_hook=CrashOnce(epoch=0, delay_s=0))
    assert not (tmp_path / "new").exists()
    assert list((tmp_path / "empty").iterdir()) == []

    with pytest.raises(PipelineError, match="training failed"):
        train(config, small_dataset, tmp_path / "resumable", epoch_hook=CrashOnce(epoch=1))
    assert not (tmp_path / "resumable" / TRAIN_SUMMARY_FILE).exists()
    assert find_latest_checkpoint(str(tmp_path / "resumable" / "ray")).endswith("checkpoint_epoch_0000")


def test_resume_continues_an_earlier_run(tmp_path, trained_run, small_dataset):
    """The session's 3-epoch run, copied, continued to 4 epochs: one epoch runs."""
    out = copy_of_trained_run(trained_run, tmp_path / "run")
    config = load_config(overrides=[*TRAINED_RUN, "train.epochs=4"])
    result = train(config, small_dataset, out, resume=True)
    assert result.summary["worker_group_starts"] == [3]
    assert [row["epoch"] for row in history(out)] == [0, 1, 2, 3]


def test_resume_without_checkpoint_is_an_error(tmp_path, small_dataset):
    with pytest.raises(PipelineError, match="no checkpoint found"):
        train(load_config(overrides=TINY), small_dataset, tmp_path / "run", resume=True)


def test_unreachable_address_fails_fast(tmp_path, small_dataset):
    config = load_config(overrides=[*TINY, "ray.address=127.0.0.1:9"])
    started = time.monotonic()
    with pytest.raises(PipelineError, match="cannot reach Ray cluster at 127.0.0.1:9"):
        train(config, small_dataset, tmp_path / "run")
    assert time.monotonic() - started < 10


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="not an ingested dataset"):
        train(load_config(overrides=TINY), tmp_path / "nothing", tmp_path / "run")


def test_shard_cache_shuffles_every_cached_image_each_epoch():
    from pipeline.training.shard_cache import ShardCache

    cache = ShardCache()
    images = np.arange(10 * 28 * 28, dtype=np.uint32).reshape(10, 28, 28).astype(np.uint8)
    images[:, 0, 0] = np.arange(10)  # row ids
    for start in range(0, 10, 3):
        cache.add(images[start : start + 3])
    cache.seal(min_rows=8)
    first = [batch[:, 0, 0].tolist() for batch in cache.epoch_batches(batch=4, steps=2, seed=1)]
    second = [batch[:, 0, 0].tolist() for batch in cache.epoch_batches(batch=4, steps=2, seed=2)]
    assert [len(b) for b in first] == [4, 4]
    assert len(set(sum(first, []))) == 8  # no image twice in an epoch
    assert first != second


def test_shard_cache_gives_up_when_too_big_or_short():
    from pipeline.training.shard_cache import ShardCache

    images = np.zeros((10, 28, 28), np.uint8)
    big = ShardCache(limit_bytes=images.nbytes - 1)
    big.add(images)
    big.seal(min_rows=1)
    assert big.images is None
    short = ShardCache()
    short.add(images)
    short.seal(min_rows=11)
    assert short.images is None


def test_diverging_training_stops_in_one_line_and_writes_no_model(tmp_path, capsys, small_dataset, ray_local):
    out = tmp_path / "run"
    argv = ["train", "--data", str(small_dataset), "--out", str(out), "--epochs", "3"]
    for item in [*TINY, "train.learning_rate=1"]:  # seeded: diverges within the first chunk
        argv += ["--set", item]
    assert main(argv) == 2
    line = single_error_line(capsys.readouterr().err)
    assert re.search(r"training diverged: non-finite weights within steps 1-8 of 16 in epoch 1", line), line
    assert not out.exists()  # no epoch was reported: nothing to resume, nothing left


def test_batch_larger_than_the_split_is_refused_before_anything_runs(tmp_path, capsys, small_dataset):
    out = tmp_path / "run"
    argv = ["train", "--data", str(small_dataset), "--out", str(out), "--set", "train.batch_size=2048"]
    assert main(argv) == 2
    line = single_error_line(capsys.readouterr().err)
    assert "train.batch_size 2048 does not fit the training split: 1024 rows over 1 worker is 1024" in line
    assert not out.exists()


def copy_of_trained_run(trained_run, target):
    """The session's trained output (3 epochs of the TRAINED_RUN config), to resume from."""
    import shutil

    shutil.copytree(trained_run.out, target, symlinks=True)
    return target


# The config of conftest's trained_run; resuming it needs the same architecture.
TRAINED_RUN = ["model.preset=seed", "model.latent_dim=4", "model.context=rows", "train.batch_size=64"]


def test_resume_from_a_non_finite_checkpoint_is_refused_before_ray(tmp_path, small_dataset, trained_run):
    out = copy_of_trained_run(trained_run, tmp_path / "run")
    checkpoint = Path(find_latest_checkpoint(str(out / "ray")))
    poison_keras_file(checkpoint / "vae.keras")
    with pytest.raises(PipelineError, match="vae.keras: 1 weight arrays hold NaN or Inf"):
        train(load_config(overrides=[*TRAINED_RUN, "train.epochs=4"]), small_dataset, out, resume=True)


def test_a_user_error_raised_in_a_worker_comes_back_as_its_own_line(tmp_path, small_dataset, trained_run):
    """The checkpoint lives behind a URI, so only the workers read it: a damaged one
    fails inside Ray Train, and its PipelineError must reach the user unwrapped."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(trained_run.out / "ray", store)
    saved = Path(find_latest_checkpoint(str(store))) / "vae.keras"
    saved.write_bytes(b"not a zip file")
    overrides = [*TRAINED_RUN, f"train.storage_path=file://{store}", "train.epochs=4", "train.max_failures=0"]
    with pytest.raises(PipelineError) as info:
        train(load_config(overrides=overrides), small_dataset, tmp_path / "run", resume=True)
    message = str(info.value)
    assert "vae.keras: unreadable Keras model file" in message and "\n" not in message
    assert not (tmp_path / "run" / TRAIN_SUMMARY_FILE).exists()


def test_a_lost_progress_channel_does_not_stop_a_worker(ray_local, capfd):
    """The driver's queue actor dies with its node: rank 0 carries on, rank 1 never speaks."""
    from ray.util.queue import Queue

    from pipeline.training.worker_context import Worker

    config = load_config(None)
    queue = Queue()
    speaker = Worker(config, rank=0, world=2, batch=8, steps_per_epoch=1, progress=queue)
    speaker.tell_driver({"epoch": 0})
    assert queue.get(timeout=10) == {"epoch": 0}
    ray_local.kill(queue.actor)  # asynchronous: a call sent just after it may still be served
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray_local.get(queue.actor.qsize.remote(), timeout=10)
        except ray_local.exceptions.RayActorError:
            break
        time.sleep(0.1)
    speaker.tell_driver({"epoch": 1})
    assert "progress channel lost" in capfd.readouterr().err
    Worker(config, rank=1, world=2, batch=8, steps_per_epoch=1, progress=queue).tell_driver({"epoch": 1})
    assert capfd.readouterr().err == ""


def test_latest_checkpoint_is_the_highest_epoch_then_the_later_run(tmp_path):
    assert find_latest_checkpoint(str(tmp_path / "none")) is None
    for run, epoch in [
        ("vae-train-20261127-080000", 3),
        ("vae-train-20261127-090000", 3),
        ("vae-train-20261127-090000", 2),
        ("vae-train-20261127-100000", 1),
    ]:
        directory = tmp_path / run / f"checkpoint_epoch_{epoch:04d}"
        directory.mkdir(parents=True)
        (directory / "vae.keras").write_bytes(b"x")
    (tmp_path / "vae-train-20261127-110000" / "checkpoint_epoch_0009").mkdir(parents=True)  # empty: never written
    assert find_latest_checkpoint(str(tmp_path)) == str(
        tmp_path / "vae-train-20261127-090000" / "checkpoint_epoch_0003"
    )


def test_a_checkpoint_uploaded_but_never_registered_is_resumed_from(tmp_path, trained_run, monkeypatch, capsys):
    """A node that dies after its worker uploaded epoch 2's checkpoint, but before Ray's
    controller took the report, restarts with Ray handing back epoch 1: the run's storage
    holds epoch 2, which is used. A half-uploaded one is passed over for Ray's."""
    import shutil

    import ray.train
    import tensorflow as tf

    from pipeline.training.worker import build_model_and_optimizer, restore
    from pipeline.training.worker_context import Worker

    storage = Path(find_latest_checkpoint(str(trained_run.out / "ray"))).parent
    run = tmp_path / "vae-20261127-210000"
    for epoch in (1, 2):
        shutil.copytree(storage / f"checkpoint_epoch_000{epoch}", run / f"checkpoint_epoch_000{epoch}")
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(run / "checkpoint_epoch_0001")))
    config = load_config(overrides=TRAINED_RUN)
    worker = Worker(config, rank=0, world=1, batch=64, steps_per_epoch=8, progress=None)
    model, optimizer = build_model_and_optimizer(worker, tf.distribute.get_strategy())

    start, history = restore(model, optimizer, None, str(run))
    assert (start, [row["epoch"] for row in history]) == (3, [0, 1, 2])
    assert restore(model, optimizer, None, None)[0] == 2  # without the run's storage: Ray's own

    (run / "checkpoint_epoch_0002" / "optimizer.npz").unlink()  # the upload cut short
    start, history = restore(model, optimizer, None, str(run))
    assert (start, len(history)) == (2, 2)
    assert "not resuming from" in capsys.readouterr().err


def test_a_step_of_two_groups_applies_the_sum_of_each_groups_own_gradients():
    """A worker of 2 groups: the step's update is the sum of each group's gradients, each
    group on its half of the batch with its own noise seed and its own contrastive
    negatives (as a worker of its own would). Plain SGD at rate 1, so that the weights
    move by exactly the summed gradient."""
    import keras
    import tensorflow as tf

    from pipeline.training.schedules import free_bits_schedule
    from pipeline.training.steps import make_group_gradients, make_replica_step
    from pipeline.training.worker import build_model_and_optimizer
    from pipeline.training.worker_context import Worker

    config = load_config(overrides=[*TRAINED_RUN, "train.num_workers=1", "train.cpus_per_worker=2"])
    worker = Worker(config, rank=0, world=1, batch=64, steps_per_epoch=1, progress=None, groups=2)
    free_bits = free_bits_schedule(config, 1)
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8))
    seeds = tf.constant([[7, 0], [7, 1]])
    model, _ = build_model_and_optimizer(worker, tf.distribute.get_strategy())
    optimizer = keras.optimizers.SGD(1.0)
    optimizer.build(model.trainable_variables)
    before = [v.numpy() for v in model.trainable_variables]

    group_gradients = make_group_gradients(worker, model, optimizer, free_bits)
    (first, first_sums), (second, second_sums) = (
        group_gradients(images[:32], seeds[0]),
        group_gradients(images[32:], seeds[1]),
    )
    sums = tf.function(make_replica_step(worker, model, optimizer, free_bits))(images, seeds)

    assert not np.allclose(first[0], second[0])  # each group its own images
    np.testing.assert_allclose(sums, first_sums + second_sums, rtol=1e-5)
    for old, variable, a, b in zip(before, model.trainable_variables, first, second, strict=True):
        step = old - variable.numpy()  # to within float32's rounding of the weights themselves
        slack = 4 * np.finfo(np.float32).eps * float(np.abs(old).max()) + 1e-5 * float(np.abs(a + b).max())
        np.testing.assert_allclose(step, a + b, rtol=1e-4, atol=slack)
    assert int(optimizer.iterations) == 1
