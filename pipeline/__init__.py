"""Fashion-MNIST VAE pipeline: ingest -> train -> evaluate -> export.

Each stage reads the previous stage's output directory and writes its own; the
contracts (file names, schema) live in :mod:`pipeline.schema`.
"""

__version__ = "0.2.0"
