import pytest

from pipeline.cli import main
from tests.helpers import usage_error_line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "d", "--out", "o", "--set", "train.epochs=0"], "config: train.epochs must be >= 1"),
        (["train", "--data", "d", "--out", "o", "--set", "train.epoch=3"], "config: unknown key train.epoch"),
        (
            ["evaluate", "--data", "d", "--model", "m", "--out", "o", "--config", "missing.toml"],
            "config file not found",
        ),
        (["export", "--model", "nothing", "--out", "o"], "no trained model"),
        (["run", "--run-dir", "r", "--force", "trian"], "unknown stage 'trian'"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vae-pipeline: error: ") and message in err[0]


def test_misspelt_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", "d", "--out", "o", "--epoch", "3"])
    assert info.value.code == 2
    assert "unrecognized arguments: --epoch" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--out", "X"], "the following arguments are required: --data (see vae-pipeline train --help)"),
        (["trian"], "argument COMMAND: invalid choice: 'trian'"),
        (["ingest", "--out", "o", "--limit", "ten"], "argument --limit: invalid int value: 'ten'"),
    ],
)
def test_usage_errors_are_one_line_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    line = usage_error_line(main, argv, capsys)
    assert line.startswith("vae-pipeline: error: ") and message in line
    assert list(tmp_path.iterdir()) == []


def test_flags_override_set_and_file(tmp_path):
    from pipeline.cli import TRAIN_FLAGS, build_config, make_parser

    config_file = tmp_path / "c.toml"
    config_file.write_text("[train]\nepochs = 5\nnum_workers = 4\nbatch_size = 128\n")
    args = make_parser().parse_args(
        ["train", "--data", "d", "--out", "o", "--config", str(config_file), "--set", "train.epochs=7", "--epochs", "9"]
    )
    config = build_config(args, TRAIN_FLAGS)
    assert config.train.epochs == 9 and config.train.num_workers == 4


def test_verbose_adds_the_traceback_before_the_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--verbose", "export", "--model", "nothing", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("vae-pipeline: error: ")
