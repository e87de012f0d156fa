"""`vae-pipeline run` and around it: the loop over the stages, local and object-store runs,
RUNS/latest, fetch and submit."""
