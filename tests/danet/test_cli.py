"""The danet command itself: help without torch, --version, plain help text, run directories, threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from danet import __version__, cli
from danet.cli import main
from danet.config import TrainConfig
from danet.io.output_paths import check_name_length, check_output_file
from danet.runtime import set_threads
from danet.training.run_dir import LATEST, mark_latest, resolve_checkpoint

REPO = Path(__file__).resolve().parents[2]

_IMPORTED_AFTER_HELP = """
import contextlib, io, json, sys
from danet.cli import main
for argv in {argvs!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)
heavy = sorted(m for m in ("torch", "timm", "matplotlib", "torchvision", "numpy", "PIL") if m in sys.modules)
print(json.dumps(heavy))
"""


def test_help_of_every_command_imports_no_torch() -> None:
    """`danet --help` and every `danet <command> --help` parse their options with the standard library."""
    argvs = [["--help"], ["--version"]] + [[name, "--help"] for name in cli.COMMANDS]
    code = _IMPORTED_AFTER_HELP.format(argvs=argvs)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_python_m_danet_cli_help_imports_no_torch() -> None:
    """The documented entry point, as a subprocess: its sys.modules at exit hold no torch."""
    code = ("import runpy, sys\nsys.argv = ['danet', '--help']\ntry:\n"
            "    runpy.run_module('danet.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert "train" in result.stdout and result.stdout.strip().splitlines()[-1] == "False"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"danet-fused {__version__}"


def test_help_is_plain_text_and_keeps_line_continuations(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train = capsys.readouterr().out
    for text in (top, train):
        assert "``" not in text and ":func:" not in text
    # the torchrun example keeps its backslash and its line break
    assert "--rdzv_endpoint=host0:29500 \\\n" in train


def test_option_names_match_the_modules_that_use_them(capsys: pytest.CaptureFixture[str]) -> None:
    from danet.commands.predict import MAX_WHOLE_PIXELS
    from danet.models.export import EXPORTERS

    assert set(cli.EXPORT_FORMATS) == set(EXPORTERS)  # the names danet.config offers, all served
    assert set(cli.COMMANDS) == set(cli._OPTIONS)
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert f"= {MAX_WHOLE_PIXELS})" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


# ------------------------------------------------------------------------------ run directories


def _run_dir(root: Path, name: str, *checkpoints: str) -> Path:
    run = root / "runs" / name
    run.mkdir(parents=True)
    for checkpoint in checkpoints:
        (run / checkpoint).write_bytes(b"x")
    return run


def test_checkpoint_argument_takes_a_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    both = _run_dir(tmp_path, "a", "checkpoint_best.pt", "last.pt")
    last_only = _run_dir(tmp_path, "b", "last.pt")
    empty = _run_dir(tmp_path, "c")
    assert resolve_checkpoint(both) == both / "checkpoint_best.pt"
    assert f"using {both / 'checkpoint_best.pt'}" in capsys.readouterr().out
    assert resolve_checkpoint(str(last_only)) == last_only / "last.pt"
    assert resolve_checkpoint(both / "last.pt") == both / "last.pt"  # a file is taken as it is
    with pytest.raises(FileNotFoundError, match=r"is a directory without checkpoint_best.pt or last.pt"):
        resolve_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: nope\.pt"):
        resolve_checkpoint("nope.pt")
    with pytest.raises(FileNotFoundError, match="runs/latest does not exist"):
        resolve_checkpoint("latest")


def test_latest_points_at_the_last_run_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    first = _run_dir(tmp_path, "synthetic-1", "last.pt")
    second = _run_dir(tmp_path, "synthetic-2", "checkpoint_best.pt")
    assert mark_latest(Path("runs/synthetic-1")) == LATEST
    assert resolve_checkpoint("latest").resolve() == (first / "last.pt").resolve()
    mark_latest(Path("runs") / "synthetic-2")
    assert os.readlink(LATEST) == "synthetic-2"  # relative: the runs folder can move
    assert resolve_checkpoint("latest").resolve() == (second / "checkpoint_best.pt").resolve()
    assert "(runs/latest -> synthetic-2)" in capsys.readouterr().out
    assert mark_latest(tmp_path / "elsewhere" / "run") is None  # only runs under runs/
    assert os.readlink(LATEST) == "synthetic-2"
    assert not any(p.name.startswith(".latest") for p in (tmp_path / "runs").iterdir())


def test_training_keeps_the_latest_pointer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`danet train` points runs/latest at its run, and `--checkpoint latest` then evaluates it."""
    monkeypatch.chdir(tmp_path)
    overrides = ["train.iters=1", "train.progress=false", "data.train_samples=8", "data.val_samples=2",
                 "data.image_size=32", "data.crop_size=32", "data.base_size=32"]
    assert main(["train", "--output", "runs/tiny", "--set", *overrides]) == 0
    assert os.readlink(LATEST) == "tiny"
    assert main(["eval", "--checkpoint", "latest", "--device", "cpu", "--no-progress", "--workers", "0"]) == 0
    assert f"using {LATEST / 'checkpoint_best.pt'}" in capsys.readouterr().out


# ------------------------------------------------------------------------------ outputs, threads


def test_output_checks(tmp_path: Path) -> None:
    (tmp_path / "figure.png").mkdir()
    with pytest.raises(ValueError, match="is a directory, and a file is written here"):
        check_output_file(tmp_path / "figure.png", overwrite=True)
    (tmp_path / "old.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="exists \\(pass --overwrite"):
        check_output_file(tmp_path / "old.png", overwrite=False)
    assert check_output_file(tmp_path / "old.png", overwrite=True) == tmp_path / "old.png"
    with pytest.raises(ValueError, match="output name too long for the file system"):
        check_name_length(tmp_path / ("n" * 250 + "_mask.png"))
    check_name_length(tmp_path / ("n" * 251 + ".png"))  # 255 bytes: the usual limit, just fits


def test_threads(capsys: pytest.CaptureFixture[str]) -> None:
    before = torch.get_num_threads()
    try:
        assert TrainConfig().threads == 1
        assert set_threads(1) == 1 == torch.get_num_threads()
        assert set_threads(0) == 1  # 0 leaves the count as it is
        with pytest.raises(ValueError, match="must be an integer >= 0"):
            set_threads(-1)
        with pytest.raises(SystemExit):
            main(["eval", "--help"])
        assert "--threads N" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
