"""Ray: connecting to a cluster or starting a local one, and the watchdog that stops it."""
