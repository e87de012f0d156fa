"""Training on Ray Train: the per-worker loop, its compiled step, the shard cache, the
schedules, and checkpoints and the model store."""
