"""One Ray Train worker's place in the run, and the batch arithmetic its steps share."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config

# Events after which every worker returns without training on (a raised error would be
# retried by Ray Train, and would fail again); the driver raises their `message`.
STOP_EVENTS = ("diverged", "storage_failed")


@dataclass(frozen=True)
class Worker:
    """This worker's place in the run and the batch arithmetic every step shares."""

    config: Config
    rank: int
    world: int
    batch: int  # images per worker per step
    steps_per_epoch: int
    progress: Any  # a ray.util.queue.Queue for the driver, or None
    groups: int = 1  # the worker's batch is split into this many groups (TrainConfig.groups)

    @property
    def group_batch(self) -> int:
        return self.batch // self.groups

    @property
    def global_batch(self) -> int:
        return self.batch * self.world

    def tell_driver(self, event: dict[str, Any]) -> None:
        """Rank 0 speaks for the worker group. The channel is for progress lines only: if
        its actor is gone (its node died), training goes on without them."""
        if self.rank != 0 or self.progress is None:
            return
        import ray

        try:
            self.progress.put(event)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            print(f"train: progress channel lost ({type(exc).__name__}); epoch lines stop", file=sys.stderr)
