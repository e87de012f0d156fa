"""Training across Ray nodes on this machine, and a worker node killed mid-epoch."""

import json
import subprocess
import sys
import time

EPOCHS = 4


def test_a_worker_node_killed_mid_epoch_is_replaced_and_training_resumes(tmp_path, ray_nodes, small_dataset):
    """One worker on each worker node (2 CPUs each, nodes of 3: two never fit on one).
    SIGKILL one node's raylet as soon as an epoch is logged, add a fresh node: the worker
    group restarts on it from the latest checkpoint and every epoch is there once. The
    driver's progress queue must survive too (it once lived on a worker node)."""
    out = tmp_path / "train"
    command = [sys.executable, "-m", "pipeline.cli", "train", "--data", str(small_dataset), "--out", str(out)]
    command += ["--address", ray_nodes.address]
    for item in (
        "model.preset=seed",
        "model.latent_dim=2",
        f"train.epochs={EPOCHS}",
        "train.batch_size=32",
        "train.num_workers=2",
        "train.cpus_per_worker=2",
        "train.max_failures=2",
    ):
        command += ["--set", item]
    # The cluster's client environment: a Ray started in this process (other tests') has
    # set RAY_AUTH_MODE=token here, which this test cluster does not use.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ray_nodes.env)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)
    epochs_done = metrics.read_text().count("\n")
    killed_at = time.time()
    ray_nodes.kill_worker("w1")
    ray_nodes.add_worker("w3", cpus=3)
    stdout, stderr = process.communicate(timeout=400)
    assert process.returncode == 0, stderr[-3000:]

    summary = json.loads((out / "train.json").read_text())
    starts, start_times = summary["worker_group_starts"], summary["worker_group_start_times"]
    assert summary["epochs"] == EPOCHS and len(starts) == 2, summary
    # Resumed from a checkpoint, not from scratch. (The killed node's worker may still
    # finish and checkpoint the epoch in flight before it notices its raylet is gone.)
    assert starts[0] == 0 and 1 <= starts[1] < EPOCHS
    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["epoch"] for row in history] == list(range(EPOCHS))
    recovery_s = start_times[1] - killed_at
    redone = max(0, epochs_done - starts[1])
    print(
        f"\nnode failure: training running again {recovery_s:.1f} s after the node's death; "
        f"{epochs_done} epochs logged when killed, resumed at epoch {starts[1] + 1} ({redone} completed epochs redone "
        "plus the one in flight)"
    )
    assert recovery_s > 0
    assert "resuming at epoch" in stderr
