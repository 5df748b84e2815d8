"""What a user sees in a terminal, and what lands in files when there is none: help texts, progress
bars, default output paths, what git ignores."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from danet import cli
from danet.cli import main
from tests.danet.training_helpers import REPO, TINY, TerminalStream, save_checkpoint, tiny_model


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_examples_keep_their_line_breaks(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An example continued with a backslash stays two lines (a docstring's bare backslash-newline
    joins them into one line with a gap, as `danet predict --help` showed its Cityscapes example)."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    description = capsys.readouterr().out.split("\n\n", 1)[1].split("\noptions:")[0]
    joined = [line for line in description.splitlines() if re.search(r"\S {2,}--?\w", line)]
    assert joined == []
    source = Path(importlib.util.find_spec(cli.COMMANDS[command]).origin).read_text()
    continued = re.findall(r"^(.*\S) \\\\$", source, flags=re.MULTILINE)  # " \\" ending a source line
    for line in continued:
        assert line.strip() + " \\\n" in description


def test_progress_bars_only_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Into a file or a pipe (pytest's capture is one) no bar is drawn; on a terminal it is."""
    monkeypatch.chdir(tmp_path)
    args = ["train", "--set", *TINY, "train.iters=2", "train.progress=true", "--output"]
    assert main([*args, "piped"]) == 0
    assert "epoch 1/" not in capsys.readouterr().err
    terminal = TerminalStream()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main([*args, "terminal"]) == 0
    assert "epoch 1/" in terminal.getvalue() and "img_s=" in terminal.getvalue()


def test_outputs_of_the_readme_commands_are_ignored_by_git() -> None:
    """The README's benchmark and test-server commands write results.json and results/; training runs/."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["results.json", "results/benchmarks.md", "runs/synthetic-20260101-120000/last.pt",
             "runs/lr_policies.png"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == paths


def test_lr_plot_writes_into_runs_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Not into the current directory (a checkout's root, where git would see it): into runs/."""
    monkeypatch.chdir(tmp_path)
    assert main(["lr-plot", "--policies", "poly", "--iters", "20"]) == 0
    assert "wrote runs/lr_policies-synthetic.png" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]


def test_attention_on_a_large_image_estimates_and_shows_progress(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Above a megapixel (here: lowered to 1000 pixels) the estimate first, then a bar over the stages;
    a 12-megapixel image ran 238 s without either."""
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", tiny_model())
    image = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
    args = ["attention", str(image), "--points", "3,4", "--checkpoint", str(checkpoint), "--device", "cpu",
            "--output"]
    assert main([*args, str(tmp_path / "small.png")]) == 0
    assert "estimated" not in capsys.readouterr().out
    monkeypatch.setattr("danet.commands.attention.LONG_INFERENCE_PIXELS", 1000)
    terminal = TerminalStream()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main([*args, str(tmp_path / "large.png")]) == 0
    printed = capsys.readouterr().out
    assert "48x40 (0.0 MP), one forward, estimated" in printed and "on this CPU" in printed
    assert "attention: 100%" in terminal.getvalue() and "15/15" in terminal.getvalue()  # 8 + 7 stages


def test_an_images_alpha_channel_is_not_dropped_without_a_word(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", tiny_model())
    rgba = np.random.default_rng(0).integers(0, 256, (32, 40, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "logo.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "photo.png")
    assert main(["predict", str(tmp_path / "logo.png"), str(tmp_path / "photo.png"), "--checkpoint",
                 str(checkpoint), "--device", "cpu", "--output", str(tmp_path / "pred")]) == 0
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'logo.png'}: its alpha channel is ignored" in printed
    assert "photo.png: its alpha" not in printed
    assert main(["attention", str(tmp_path / "logo.png"), "--points", "1,1", "--checkpoint", str(checkpoint),
                 "--device", "cpu", "--output", str(tmp_path / "attention.png")]) == 0
    assert "logo.png: its alpha channel is ignored" in capsys.readouterr().out


def test_python_m_danet_runs_the_command() -> None:
    """`python -m danet` (not only `python -m danet.cli`), as the README's commands may be run."""
    result = subprocess.run([sys.executable, "-m", "danet", "--version"], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert result.stdout.startswith("danet-fused ")
