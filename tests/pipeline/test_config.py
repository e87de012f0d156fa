import json
import subprocess
import sys

import pytest

from pipeline.config import Config, load_config
from pipeline.errors import PipelineError


def test_defaults_round_trip_through_dict():
    config = Config()
    assert Config.from_dict(config.to_dict()) == config


def test_toml_file_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("seed = 3\n[train]\nepochs = 7\nlearning_rate = 0.01\n[model]\nfilters = [8, 16]\n")
    config = load_config(path, ["train.epochs=2", "data.limit=100"])
    assert config.seed == 3
    assert config.train.epochs == 2
    assert config.train.learning_rate == 0.01
    assert config.model.filters == (8, 16)
    assert config.data.limit == 100


@pytest.mark.parametrize(
    ("overrides", "groups"),
    [
        ([], 2),  # the default: one worker, a group on each of its 2 CPUs
        (["train.num_workers=2", "train.cpus_per_worker=1"], 1),
        (["train.cpus_per_worker=3"], 2),  # 3 does not divide 128: the most that does
        (["train.cpus_per_worker=8", "train.batch_size=4"], 4),  # no more groups than images
        (["train.use_gpu=true"], 1),
        (["train.groups_per_worker=4"], 4),
    ],
)
def test_groups_per_worker_default_to_one_per_cpu_that_divides_the_batch(overrides, groups):
    assert load_config(overrides=overrides).train.groups == groups


def test_yaml_file_is_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 64\n")
    assert load_config(path).train.batch_size == 64


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown key train.epoch"),
        ("trian.epochs=3", "unknown key trian"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("train.epochs=abc", "train.epochs must be an integer"),
        ("train.steps_per_execution=0", "train.steps_per_execution must be >= 1"),
        ("train.learning_rate=-1", "train.learning_rate must be >= 1e-8 and <= 1"),
        ("train.learning_rate=1e-320", "train.learning_rate must be >= 1e-8 and <= 1"),
        ("seed=-1", "seed must be >= 0 and <= 2147483647"),
        ("seed=2147483648", "seed must be >= 0 and <= 2147483647"),
        ("data.source=http://x", "data.source must be"),
        ("train.num_workers=3", "train.batch_size (128) must be a multiple of train.num_workers (3)"),
        ("train.groups_per_worker=0", "train.groups_per_worker must be >= 1 and at most the worker's batch (128)"),
        ("train.groups_per_worker=3", "train.groups_per_worker (3) must divide the worker's batch (128 = "),
        ("train.use_gpu=1", "train.use_gpu must be true or false"),
        ("export.opset=13", "export.opset must be >= 17"),
        ("train.learning_rate=Infinity", "train.learning_rate must be a finite number, got inf"),
        ("train.learning_rate=NaN", "train.learning_rate must be a finite number, got nan"),
        ("train.learning_rate=2", "train.learning_rate must be >= 1e-8 and <= 1"),
        ("model.beta=-Infinity", "model.beta must be a finite number"),
        ("train.free_bits=1e400", "train.free_bits must be a finite number"),
        ("train.free_bits_final=-1", "train.free_bits_final must be >= 0 and <= 100"),
        ("train.free_bits_fall_epochs=0", "train.free_bits_fall_epochs must be >= 1"),
        ("export.tolerance=1", "export.tolerance must be > 0 and < 1"),
        ("train.contrastive_weight=-1", "train.contrastive_weight must be >= 0 and <= 1000 (0: off)"),
        ("train.contrastive_temperature=0", "train.contrastive_temperature must be > 0 and <= 10"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(PipelineError, match="config: ") as info:
        load_config(overrides=[override])
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("name", "text"),
    [("c.toml", "[train]\nlearning_rate = inf\n"), ("c.yaml", "train:\n  learning_rate: .nan\n")],
)
def test_non_finite_numbers_in_files_are_refused(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PipelineError, match="train.learning_rate must be a finite number"):
        load_config(path)


def test_malformed_override_and_file_are_errors(tmp_path):
    with pytest.raises(PipelineError, match="section.key=value"):
        load_config(overrides=["train.epochs"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1")
    with pytest.raises(PipelineError, match="cannot parse config"):
        load_config(bad)
    with pytest.raises(PipelineError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_model_section_resolves_preset_with_overrides():
    config = load_config(overrides=["model.preset=seed", "model.latent_dim=8"])
    architecture = config.model.architecture()
    assert architecture["latent_dim"] == 8
    assert tuple(architecture["filters"]) == (32, 64)
    assert architecture["dense_units"] == 16
    assert architecture["context"] == "none"
    assert (
        load_config(overrides=["model.preset=seed", "model.context=above"]).model.architecture()["context"] == "above"
    )
    assert tuple(load_config().model.architecture()["decoder_filters"]) == (32, 32)  # the default preset's
    wider = load_config(overrides=["model.decoder_filters=[64, 48]"]).model.architecture()
    assert tuple(wider["decoder_filters"]) == (64, 48) and tuple(wider["filters"]) == (32, 64)


@pytest.mark.parametrize("word", ["none", "None"])
def test_set_context_none_is_the_word_not_the_presets_value(word):
    """`none` is one of model.context's values: `--set model.context=none` must switch the
    default preset's `rows` context off (it used to mean "unset" and kept `rows`), while
    `none` in a numeric field still means unset and `null` unsets any field."""
    assert load_config().model.architecture()["context"] == "rows"
    assert load_config(overrides=[f"model.context={word}"]).model.architecture()["context"] == "none"
    assert load_config(overrides=["model.context=null"]).model.architecture()["context"] == "rows"
    assert load_config(overrides=[f"train.free_bits_final={word}"]).train.free_bits_final is None
    assert load_config(overrides=[f"ray.address={word}"]).ray.address is None


MODEL_KEY_ERRORS = [
    ("model.preset=huge", "model.preset must be one of ['default', 'seed'], got 'huge'"),
    ("model.latent_dim=0", "model.latent_dim must be >= 1 and <= 784 (the pixels of an image), got 0"),
    ("model.latent_dim=100000000", "model.latent_dim must be >= 1 and <= 784 (the pixels of an image), got 100000000"),
    ("model.filters=[8]", "model.filters must be two integers from 1 to 1024, got (8,)"),
    ("model.filters=[8, 0]", "model.filters must be two integers from 1 to 1024, got (8, 0)"),
    ("model.filters=[8, 100000]", "model.filters must be two integers from 1 to 1024, got (8, 100000)"),
    ("model.decoder_filters=[32, 0]", "model.decoder_filters must be two integers from 1 to 1024, got (32, 0)"),
    ("model.convs_per_stage=0", "model.convs_per_stage must be >= 1, got 0"),
    ("model.dense_units=0", "model.dense_units must be >= 1 and <= 16384, got 0"),
    ("model.activation=tanhh", "model.activation must be one of ('relu', 'elu', 'gelu', 'swish'), got 'tanhh'"),
    ("model.context=left", "model.context must be one of ['above', 'none', 'rows'], got 'left'"),
    (
        "model.likelihood=gaussian",
        "model.likelihood must be one of ('bernoulli', 'continuous_bernoulli'), got 'gaussian'",
    ),
    ("model.beta=0", "model.beta must be > 0 and <= 1000, got 0.0"),
    ("model.beta=1001", "model.beta must be > 0 and <= 1000, got 1001.0"),
]


@pytest.mark.parametrize(("override", "message"), MODEL_KEY_ERRORS)
def test_every_model_key_is_checked_by_the_model_definition_itself(override, message):
    with pytest.raises(PipelineError) as info:
        load_config(overrides=[override])
    assert str(info.value) == f"config: {message}"


def test_a_bad_model_key_fails_on_the_command_line_without_keras_or_ray():
    """`--set model.activation=tanhh` once passed validation and failed in a Ray worker
    two minutes later; now it is one line, exit 2, and neither Keras nor Ray is loaded."""
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        "codes = [main(['train', '--data', 'nowhere', '--out', 'nowhere', '--set', o]) for o in sys.argv[1:]]\n"
        "loaded = sorted(m for m in ('keras', 'tensorflow', 'ray') if m in sys.modules)\n"
        "print(codes, loaded)\n"
    )
    overrides = [override for override, _ in MODEL_KEY_ERRORS]
    result = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == f"{[2] * len(overrides)} []", result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines == [f"vae-pipeline: error: config: {message}" for _, message in MODEL_KEY_ERRORS]


def test_config_dict_is_json_ready():
    assert json.loads(json.dumps(Config().to_dict()))["train"]["epochs"] == Config().train.epochs


def test_the_ray_address_has_one_place_and_the_old_key_still_reads(tmp_path):
    assert load_config(overrides=["ray.address=10.0.0.1:6379"]).ray.address == "10.0.0.1:6379"
    old = tmp_path / "old.toml"
    old.write_text('[train]\nepochs = 2\naddress = "10.0.0.2:6379"\n')
    config = load_config(old)
    assert config.ray.address == "10.0.0.2:6379" and config.train.epochs == 2
    assert "address" not in config.to_dict()["train"]


def test_evaluate_and_train_take_the_address_flag_and_environment_into_ray_address(monkeypatch):
    from pipeline.cli import TRAIN_FLAGS, build_config, make_parser

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.3:6379")
    args = make_parser().parse_args(["evaluate", "--data", "d", "--model", "m", "--out", "o"])
    monkeypatch.setattr("pipeline.quiet.import_tensorflow_quietly", lambda: None)
    assert build_config(args, {"address": "ray.address"}).ray.address == "10.0.0.3:6379"
    args = make_parser().parse_args(["train", "--data", "d", "--out", "o", "--address", "10.0.0.4:6379"])
    assert build_config(args, TRAIN_FLAGS).ray.address == "10.0.0.4:6379"
