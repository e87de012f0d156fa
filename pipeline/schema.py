"""Facts shared by every stage: image shape, class names, file and column names."""

from __future__ import annotations

# The artifact's file names and image shape belong to `deploy` (which never imports the pipeline).
from deploy import artifact as _artifact

IMAGE_TENSOR_SHAPE = _artifact.IMAGE_SHAPE  # (28, 28, 1): what the model and the ONNX files take
IMAGE_HEIGHT, IMAGE_WIDTH, _ = IMAGE_TENSOR_SHAPE
IMAGE_SHAPE = (IMAGE_HEIGHT, IMAGE_WIDTH)  # one image as the Parquet dataset holds it
PIXELS = IMAGE_HEIGHT * IMAGE_WIDTH
NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SPLITS = ("train", "test")
FULL_SPLIT_ROWS = {"train": 60_000, "test": 10_000}

# Parquet columns. `image` is a fixed-size list of 784 uint8 (row-major 28x28).
COLUMN_ID = "id"
COLUMN_IMAGE = "image"
COLUMN_LABEL = "label"

# The four original IDX files, as the Debian package and Zalando ship them.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Stage output contracts.
OUTPUT_MARKER = ".vae-pipeline.json"  # in every stage output: which stage wrote it, and what
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
MODEL_DIR = "model"
MODEL_FILE = "vae.keras"  # Keras native format, in TRAIN_DIR/model/ and in each checkpoint
LEGACY_WEIGHTS_FILE = "weights.npz"  # the model format before 0.2 (see `vae-pipeline upgrade-model`)
MODEL_CONFIG_FILE = "model.json"
RUN_FILE = "run.json"  # in every run directory: its config, stages and status
LATEST = "latest"  # RUNS/latest: the newest complete run (a symbolic link, or an object in a store)
CHAMPION = "champion"  # RUNS/champion: the run apps use, the newest that passed the gate or was promoted
CLUSTER_RUNS_ROOT = "~/vae-pipeline/runs"  # where `submit` puts runs on the cluster by default
RAY_STORAGE_DIR = "ray"  # Ray Train's storage in TRAIN_DIR unless train.storage_path
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_PREFIX = "checkpoint_epoch_"  # + the epoch, 4 digits
METRICS_FILE = "metrics.jsonl"
TRAIN_SUMMARY_FILE = "train.json"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
DECODER_ONNX = _artifact.DECODER_FILE
ENCODER_ONNX = _artifact.ENCODER_FILE
CHECKSUMS_FILE = _artifact.CHECKSUMS_FILE
MODEL_CARD_JSON = _artifact.MODEL_CARD_JSON
MODEL_CARD_MD = "MODEL_CARD.md"

# The `format` of each JSON contract; a reader refuses any other.
OUTPUT_FORMAT = "vae-pipeline/output/v1"
DATASET_FORMAT = "vae-pipeline/dataset/v2"
RUN_FORMAT = "vae-pipeline/run/v1"
LATEST_FORMAT = "vae-pipeline/latest/v1"  # both pointer objects, latest and champion
