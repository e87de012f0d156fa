"""The data: Fashion-MNIST sources (IDX files, tensorflow-datasets) and the Parquet dataset."""
