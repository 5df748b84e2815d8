"""The fault and bad-input campaign of issue 20, as tests: each case of the issue, reproduced.

Every test here failed before its fix. The cases are grouped as the issue lists them: several
writers on one run directory, checksums that could be hidden, a "last good" checkpoint that was
not, settings that trained silently wrong, data lost, a temporary left behind, the hang, raw
tracebacks, and messages that did not name the problem. The slow ones (real concurrent writers,
a DDP peer killed with gloo, a full disk under torch.export) run subprocesses and are marked.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import danet_kernels
from danet.cli import main as cli_main
from danet.config import RANGES, Config, load_config, read_yaml
from danet.distributed import DistributedContext, Progress
from danet.io.atomic import FileWriteError, atomic_write
from danet.io.checkpoint import LAST, LAST_GOOD, atomic_save, load_checkpoint, verify_checksum
from danet.io.output_paths import check_output_file
from danet.training.resume import StateCheck
from danet.training.run_dir import LOCK, RunDirLock, reserve_run_dir
from danet.training.trainer import NonFiniteLossError, train
from tests.danet.training_helpers import REPO, TINY, save_checkpoint, subprocess_env, tiny_config, tiny_model


def _one_line(text: str) -> bool:
    return text.count("\n") == 1 and "Traceback" not in text


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny run stopped at iteration 2 of 4 (last.pt, last_good.pt), copied by each test that changes it."""
    run = tmp_path_factory.mktemp("campaign") / "run"
    train(tiny_config(run, "train.iters=4", "train.checkpoint_interval=1", "train.val_interval=0"),
          on_step=lambda iteration, model: iteration == 2)
    return run


def _copy(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to, copy_function=shutil.copy2)
    return to


# ---------------------------------------------------------------- several writers on one run directory


def test_a_second_writer_is_refused_at_once_naming_the_holder(finished_run, tmp_path, capsys):
    """--resume R, and train -o R --overwrite, while a process trains into R: refused, naming it."""
    run = _copy(finished_run, tmp_path / "run")
    holder = RunDirLock(run)
    assert holder.acquire()
    try:
        before = (run / LAST).read_bytes()
        for args in (["train", "--resume", str(run)],
                     ["train", "--resume", str(run), "--set", "train.iters=8", "--rebase-schedule"],
                     ["train", "-o", str(run), "--overwrite", "--set", *TINY, "train.seed=2"]):
            assert cli_main(args) == 2
            err = capsys.readouterr().err
            assert _one_line(err) and f"{run} is in use" in err, err
            assert f"PID {os.getpid()} on {socket.gethostname()}" in err and "since" in err
        assert (run / LAST).read_bytes() == before
    finally:
        holder.release()
    assert not (run / LOCK).exists()
    assert cli_main(["train", "--resume", str(run)]) == 0  # free again: the resume runs
    assert not (run / LOCK).exists()


_HOLD_LOCK = """
import sys, time
from danet.training.run_dir import RunDirLock
RunDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_the_lock_dies_with_its_process(tmp_path):
    """kill -9 of the writer leaves no stale lock: the kernel releases it."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"is in use: the process with PID {proc.pid} on"):
            RunDirLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    lock = RunDirLock(tmp_path)
    assert lock.acquire()  # the lock file is still there; its lock is not
    lock.release()


def test_default_run_names_are_unique_within_one_second(tmp_path, monkeypatch):
    """Two default runs started in the same second got the same runs/<name>-<time>."""
    import danet.training.run_dir as run_dir_module

    class FrozenClock:
        @staticmethod
        def now(tz=None):
            from datetime import datetime

            return datetime(2026, 1, 1, 12, 0, 0, tzinfo=tz)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_dir_module, "datetime", FrozenClock)
    cfg = Config()
    first, second = reserve_run_dir(cfg), reserve_run_dir(cfg)
    assert first == Path("runs/synthetic-20260101-120000")
    assert second == Path("runs/synthetic-20260101-120000-2")
    assert first.is_dir() and second.is_dir()
    # a start that fails after the name was claimed leaves no directory behind
    bad = load_config("synthetic", overrides=[*TINY, f"model.pretrained={tmp_path / 'missing.pt'}"])
    with pytest.raises(FileNotFoundError):
        train(bad)
    assert sorted(p.name for p in Path("runs").iterdir()) == [first.name, second.name]


def test_a_finished_resume_from_last_good_leaves_no_temporary(finished_run, tmp_path):
    """Renaming a hard link onto its own file is a no-op: the temporary used to stay (3.3 MB)."""
    run = _copy(finished_run, tmp_path / "run")
    assert load_checkpoint(run / LAST_GOOD)["iteration"] == 1
    assert cli_main(["train", "--resume", str(run / LAST_GOOD)]) == 0
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    assert load_checkpoint(run / LAST)["iteration"] == 4


@pytest.mark.slow
def test_a_concurrent_resume_is_refused_while_the_first_trains(finished_run, tmp_path):
    """Two resumes at once (to 60 and to 80 iterations) both exited 0 and printed "done"; R held
    one of the runs and the other's hidden temporaries. Here the second starts once the first
    holds the lock: refused at once, naming it; the first is then stopped (SIGTERM) cleanly."""
    run = _copy(finished_run, tmp_path / "run")

    def resume(iters: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "danet", "train", "--resume", str(run), "--set",
                                 f"train.iters={iters}", "--rebase-schedule"], cwd=REPO, env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = resume(100000)
    try:
        deadline = time.monotonic() + 240
        while not (run / LOCK).exists() or f'"pid": {first.pid}' not in (run / LOCK).read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate(timeout=30)
            time.sleep(0.1)
        second = resume(80)
        _, err = second.communicate(timeout=240)
        assert second.returncode == 2, err
        assert _one_line(err) and f"is in use: the process with PID {first.pid} on" in err
        first.send_signal(signal.SIGTERM)
        _, first_err = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=30)
    assert first.returncode == 143, first_err
    assert load_checkpoint(run / LAST)["config"]["train"]["iters"] == 100000  # the first run's state only
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporaries, no lock


# ---------------------------------------------------------------- checksums that cannot be hidden


def _flip_middle(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def test_appended_or_padded_bytes_cannot_hide_damage(tmp_path, capsys):
    """Flip 64 bytes, then append 100 zero bytes (or pad to 4 KiB): evaluated without complaint."""
    model = tiny_model()
    for tail in (bytes(100), "pad"):
        path = save_checkpoint(tmp_path / "w.pt", model)
        state = torch.load(path, weights_only=True)
        atomic_save(state, path)  # as danet writes it: checksummed
        _flip_middle(path)
        size = path.stat().st_size
        extra = bytes(-size % 4096) if tail == "pad" else tail
        path.write_bytes(path.read_bytes() + extra)
        with pytest.raises(ValueError, match="is corrupted: its SHA-256 differs"):
            verify_checksum(path)
        assert cli_main(["eval", "--checkpoint", str(path), "--device", "cpu", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert _one_line(err) and "is corrupted" in err
    # undamaged but appended to: refused, with the exact way back
    intact = tmp_path / "intact.pt"
    atomic_save({"model": model.state_dict(), "config": {}, "iteration": 1}, intact)
    size = intact.stat().st_size
    intact.write_bytes(intact.read_bytes() + bytes(100))
    with pytest.raises(ValueError, match=rf"has 100 bytes after the end .*truncate -s {size} "):
        verify_checksum(intact)
    os.truncate(intact, size)
    assert verify_checksum(intact)


def test_a_cut_or_overwritten_checksum_record_is_still_recognised(tmp_path):
    path = atomic_save({"model": {"w": torch.ones(64, 64)}, "config": {}, "iteration": 1}, tmp_path / "a.pt")
    data = path.read_bytes()
    assert b"danet_checkpoint" in data[:200]  # the marker inside the archive, at its start
    path.write_bytes(data[:-77] + bytes(77))  # the checksum overwritten by zeros
    with pytest.raises(ValueError, match="is corrupted: danet wrote it, but its checksum record"):
        load_checkpoint(path)
    assert "danet_checkpoint" not in load_checkpoint(atomic_save({"model": {}, "config": {}, "iteration": 0},
                                                                 tmp_path / "b.pt"))


# ---------------------------------------------------------------- last good means good


def test_a_diverging_run_names_no_diverged_checkpoint_as_good(tmp_path):
    """optim.lr=1.0, checkpoints every 2 iterations: the loss windows rise (30, 58, 149), the
    weights reach 1e20; last_good.pt used to name one of those states."""
    cfg = tiny_config(tmp_path, "optim.lr=1.0", "train.iters=40", "train.checkpoint_interval=2",
                      "train.val_interval=0")
    with pytest.raises(NonFiniteLossError) as caught:
        train(cfg)
    message = str(caught.value)
    if (tmp_path / LAST_GOOD).exists():
        good = load_checkpoint(tmp_path / LAST_GOOD)
        windows = good["loss_windows"]
        assert windows[-1][1] <= 1.5 * windows[0][1]  # not above the untrained model's loss
        check = StateCheck(tiny_model(), torch.zeros(1, 3, 32, 32))
        check.model.load_state_dict(good["model"])
        check.begin(good["weights_at_start"])
        assert check.problems() == []
        assert f"Resume from {tmp_path / LAST_GOOD}" in message
    else:
        assert "no checkpoint had been followed by a healthy loss yet" in message


def test_state_check_finds_diverged_weights_and_a_non_finite_forward():
    model = tiny_model()
    check = StateCheck(model, torch.randn(1, 3, 32, 32))
    check.begin()
    assert check.problems() == []
    with torch.no_grad():
        model.head.conv8[1].weight.mul_(1e4)  # finite, 1e4 x: diverged
    assert any("x the largest at the run's start" in p for p in check.problems())
    with torch.no_grad():
        model.head.conv8[1].weight.div_(1e4)
        model.head.conv5a[1].running_var.fill_(-1.0)  # a buffer: the weights look fine, the output does not
    assert check.problems() == ["its forward pass on a fixed batch is not finite"]


def test_the_advice_after_a_nan_never_loops_back_with_a_tried_remedy(finished_run, tmp_path, capsys):
    """Resumed from last_good.pt with a lower LR, the run diverged again at once: the advice named
    the same checkpoint with half that LR, and so on."""
    run = _copy(finished_run, tmp_path / "run")
    good = load_checkpoint(run / LAST_GOOD)["iteration"]

    def poison(iteration, model):
        if iteration == good + 1:
            with torch.no_grad():
                model.head.conv8[1].weight.fill_(float("nan"))

    cfg = tiny_config(run, "train.iters=4", "train.checkpoint_interval=1", "train.val_interval=0",
                      "optim.lr=0.005")
    with pytest.raises(NonFiniteLossError) as caught:
        train(cfg, resume=run / LAST_GOOD, rebase_schedule=True, on_step=poison)
    message = str(caught.value)
    assert f"resumed from {run / LAST_GOOD} (iteration {good}) with optim.lr=0.005 (was 0.01)" in message
    assert "Start a new run instead" in message and "optim.lr below 0.005" in message
    assert f"--resume {run / LAST_GOOD}" not in message


# ---------------------------------------------------------------- settings that trained silently wrong


@pytest.mark.parametrize(("override", "message"), [
    ("optim.head_lr_mult=-10", "optim.head_lr_mult must be >= 0, got -10.0"),
    ("optim.weight_decay=-1", "optim.weight_decay must be >= 0, got -1.0"),
    ("optim.momentum=-0.5", "optim.momentum must be in [0, 1), got -0.5"),
    ("optim.grad_clip=.nan", "optim.grad_clip must be a finite number, got nan"),
    ("optim.lr=1e308", "optim.lr must be at most 3.40282e+38 (the largest float32)"),
    ("schedule.power=-2", "schedule.power must be >= 0, got -2.0"),
    ("schedule.policy=step schedule.gamma=-0.5", "schedule.gamma must be in (0, 1] for the step policy"),
    ("schedule.policy=exp schedule.gamma=1.5", "schedule.gamma must be in (0, 1] for the exp policy"),
    ("data.scale_range=[1e-4,2e-4]", "data.scale_range's low end x data.base_size must be at least 2"),
    ("data.mean=[123.7,116.3,103.5]", "data.mean must be in [0, 1], got 123.7"),
    ("train.seed=1180591620717411303424", "train.seed must be at most 2147483647"),
    ("data.image_size=100000", "data.image_size must be at most"),
    ("data.crop_size=100000", "data.crop_size must be at most"),
    ("data.train_samples=1000000000000", "data.train_samples must be at most"),
    ("train.threads=100000", "train.threads must be at most"),
    ("data.workers=10000", "data.workers must be at most"),
    ("eval.scales=[200]", "eval.scales must be in (0, 10], got 200.0"),
    ("dist.timeout_s=.inf", "dist.timeout_s must be a finite number"),
    ("loss.weights=[0,0,0]", "loss.weights are all 0"),
])
def test_out_of_range_settings_are_refused_naming_the_setting(override, message):
    """Each was accepted and used (gradient ascent, negative decay, ...) or failed deep inside torch."""
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(overrides=override.split())


def test_every_numeric_setting_has_a_range():
    """One table (danet.config.RANGES) for every number a config holds."""
    from dataclasses import fields, is_dataclass
    from typing import get_type_hints

    def numeric_keys(section, prefix=""):
        for f in fields(section):
            value = getattr(section, f.name)
            if is_dataclass(value):
                yield from numeric_keys(value, f"{prefix}{f.name}.")
            elif re.search(r"\b(int|float)\b", str(get_type_hints(type(section))[f.name])):
                yield f"{prefix}{f.name}"

    keys = set(numeric_keys(Config()))
    assert keys - {"model.output_stride"} <= set(RANGES), keys - set(RANGES)


def test_machine_bounds_follow_the_machine(monkeypatch):
    import danet.config as config

    monkeypatch.setattr(config, "usable_cpus", lambda: 3)
    with pytest.raises(ValueError, match=r"data\.workers must be at most 12 \(4 per CPU, this process may"):
        load_config(overrides=["data.workers=13"])
    assert load_config(overrides=["data.workers=12"]).data.workers == 12
    monkeypatch.setattr(config, "memory_bytes", lambda: 12 * 1000**2)
    with pytest.raises(ValueError, match=r"data\.crop_size must be at most 1000 \(a float32 RGB image"):
        load_config(overrides=["data.crop_size=1001", "data.base_size=64"])


def test_duplicate_yaml_keys_are_refused(tmp_path):
    user = tmp_path / "my.yaml"
    user.write_text("optim: {lr: 0.5, lr: 0.02}\n")
    with pytest.raises(ValueError, match=r"my\.yaml: duplicate key 'lr' \(line 1; YAML would keep the last"):
        read_yaml(user)
    user.write_text("optim:\n  lr: 0.5\ntrain:\n  epochs: 2\noptim:\n  momentum: 0.5\n")
    with pytest.raises(ValueError, match=r"duplicate key 'optim' \(lines 1 and 5"):
        load_config(config_file=user)
    with pytest.raises(ValueError, match=r"override optim=\{lr: 1, lr: 2\}: duplicate key 'lr'"):
        load_config(overrides=["optim={lr: 1, lr: 2}"])
    user.write_text("base: &b {lr: 1}\n")  # anchors and merges still work
    assert read_yaml(user) == {"base": {"lr": 1}}


@pytest.mark.parametrize(("command", "flags", "message"), [
    ("eval", ["--threads", "100000"], "argument --threads: must be at most"),
    ("eval", ["--scales", "inf"], "argument --scales: must be a finite number, got inf"),
    ("eval", ["--scales", "nan"], "argument --scales: must be a finite number, got nan"),
    ("eval", ["--scales", "200"], "argument --scales: must be in (0, 10], got 200.0"),
    ("eval", ["--workers", "10000"], "argument --workers: must be at most"),
    ("attention", ["--num-channels", "0"], "argument --num-channels: must be >= 1, got 0"),
    ("export", ["--size", "100000", "100000"], "argument --size: must be at most"),
])
def test_out_of_range_flags_are_refused_when_parsed(command, flags, message, capsys):
    required = {"eval": [], "attention": ["img.png", "--points", "1,1", "--output", "f.png"],
                "export": ["--output", "m.onnx"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, *required, "--checkpoint", "x.pt", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"danet {command}: error: {message}" in err and "Traceback" not in err


# ---------------------------------------------------------------- never replace a user's file


def test_a_dangling_symlink_is_never_replaced_without_overwrite(tmp_path, capsys):
    model = save_checkpoint(tmp_path / "m.pt", tiny_model())
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (40, 32), (90, 90, 90)).save(image)
    out = tmp_path / "out"
    out.mkdir()
    (out / "img_mask.png").symlink_to(tmp_path / "nowhere.png")
    args = ["predict", str(image), "--checkpoint", str(model), "--output", str(out), "--device", "cpu"]
    assert cli_main(args) == 2
    assert "img_mask.png" in capsys.readouterr().err
    assert (out / "img_mask.png").is_symlink() and not (out / "img_overlay.png").exists()
    with pytest.raises(ValueError, match="is a symbolic link to a missing file"):
        check_output_file(out / "img_mask.png", overwrite=False)
    assert cli_main([*args, "--overwrite"]) == 0  # replaced (the link, not its target) on request
    assert not (out / "img_mask.png").is_symlink() and not (tmp_path / "nowhere.png").exists()


def test_special_files_are_never_replaced(tmp_path):
    fifo = tmp_path / "out.png"
    os.mkfifo(fifo)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"is a FIFO \(named pipe\), not a regular file"):
            check_output_file(fifo, overwrite)
    with pytest.raises(FileWriteError, match="cannot replace the special file"):
        atomic_write(fifo, lambda tmp: tmp.write_text("x"))
    run = tmp_path / "run"
    run.mkdir()
    (run / LAST).symlink_to(tmp_path / "elsewhere.pt")  # a dangling link counts as another run's output
    assert cli_main(["train", "-o", str(run), "--set", *TINY, "train.iters=1"]) == 2


_BUSY_WORKERS = """
import sys, time
import torch
from torch.utils.data import Dataset
from danet.training.stopping import StopSafeDataLoader

class Slow(Dataset):
    def __len__(self):
        return 100
    def __getitem__(self, i):
        time.sleep(60)  # busy: torch's own parent check only runs between items
        return torch.zeros(1)

loader = iter(StopSafeDataLoader(Slow(), num_workers=2))
print("started", flush=True)
next(loader)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_dataloader_workers_die_with_their_parent(tmp_path):
    """kill -9 of the main process: its (busy) workers used to live on for minutes."""
    from tests.danet.test_train_faults import _children

    proc = subprocess.Popen([sys.executable, "-c", _BUSY_WORKERS], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        assert proc.stdout.readline().strip() == "started"
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = _children(proc.pid)
            time.sleep(0.1)
        assert len(workers) == 2
    finally:
        proc.kill()
        proc.wait(timeout=30)
    deadline = time.monotonic() + 3
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()
                 and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        time.sleep(0.1)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == []


# ---------------------------------------------------------------- no raw traceback from the CLI


def _inference_files(tmp_path: Path) -> tuple[Path, Path]:
    from PIL import Image

    checkpoint = save_checkpoint(tmp_path / "m.pt", tiny_model())
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 32), (90, 90, 90)).save(image)
    return checkpoint, image


def _command(name: str, checkpoint: Path, image: Path, out: Path) -> tuple[list[str], str]:
    """(the command line, the function it runs that a test makes fail)."""
    common = ["--checkpoint", str(checkpoint), "--device", "cpu"]
    return {
        "eval": (["eval", *common, "--no-progress", "--json", str(out / "m.json")],
                 "danet.commands.eval.confusion_matrices"),
        "predict": (["predict", str(image), *common, "--output", str(out)],
                    "danet.commands.predict.predict_image"),
        "attention": (["attention", str(image), "--points", "1,1", "--output", str(out / "a.png"), *common],
                      "danet.commands.attention.attention_maps"),
        "export": (["export", *common, "--format", "torch-export", "--output", str(out / "m.pt2")],
                   "danet.commands.export.SegmentationLogits"),
        "lr-plot": (["lr-plot", "--iters", "10", "--output", str(out / "lr.png")],
                    "danet.commands.lr_plot.lr_policies_figure"),
    }[name]


def _failing_command(name: str, error: BaseException, tmp_path: Path, monkeypatch) -> list[str]:
    """The command line of ``name``, whose work is made to raise ``error`` half-way."""
    checkpoint, image = _inference_files(tmp_path)
    args, target = _command(name, checkpoint, image, tmp_path / "out")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(target, fail)
    return args


@pytest.mark.parametrize("name", ["eval", "predict", "attention", "export", "lr-plot"])
def test_ctrl_c_in_any_command_is_one_line_and_130(name, tmp_path, monkeypatch, capsys):
    assert cli_main(_failing_command(name, KeyboardInterrupt(), tmp_path, monkeypatch)) == 130
    err = capsys.readouterr().err
    assert _one_line(err) and f"danet {name}: interrupted" in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []  # nothing half-written


@pytest.mark.parametrize(("error", "expected"), [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 8000000000000 bytes.\nmore C++ context"),
     "out of memory: [enforce fail"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out of memory: CUDA out of"),
    (MemoryError(), "out of memory: MemoryError"),
])
@pytest.mark.parametrize("name", ["eval", "export"])
def test_out_of_memory_is_one_line_with_what_to_try(name, error, expected, tmp_path, monkeypatch, capsys):
    assert cli_main(_failing_command(name, error, tmp_path, monkeypatch)) == 1
    err = capsys.readouterr().err
    assert _one_line(err) and f"danet {name}: {expected}" in err and "try a smaller" in err


def test_an_unexpected_error_is_one_line_and_a_traceback_file(tmp_path, monkeypatch, capsys):
    args = _failing_command("eval", RuntimeError("the unexpected\nsecond line"), tmp_path, monkeypatch)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert _one_line(err)
    assert "danet eval: unexpected error: RuntimeError: the unexpected (the full traceback" in err
    path = Path(re.search(r"the full traceback is in (\S+)\)", err).group(1))
    assert path.parent == tmp_path
    text = path.read_text()
    assert "Traceback (most recent call last)" in text and "second line" in text and "command line:" in text


def test_a_library_error_carrying_a_traceback_is_one_line(tmp_path, monkeypatch, capsys):
    """A DataLoader worker's error reaches the main process with the worker's traceback as text."""
    worker_error = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most "
                              "recent call last):\n  File \"worker.py\", line 1\nValueError: bad image")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert cli_main(_failing_command("eval", worker_error, tmp_path, monkeypatch)) == 2
    err = capsys.readouterr().err
    assert _one_line(err)
    assert "Caught ValueError in DataLoader worker process 0. (the full traceback is in" in err


def test_an_unexpected_training_error_leaves_its_traceback_in_its_run_directory(tmp_path, monkeypatch,
                                                                                 capsys):
    run = tmp_path / "run"

    def broken(self, *args, **kwargs):
        raise RuntimeError("in the step")

    monkeypatch.setattr("danet.training.trainer.Trainer._step", broken)
    assert cli_main(["train", "-o", str(run), "--set", *TINY, "train.iters=2"]) == 1
    err = capsys.readouterr().err
    assert _one_line(err) and f"the full traceback is in {run}/danet-train-" in err
    assert not (run / LOCK).exists()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (root only)")
def test_torch_export_onto_a_full_disk_is_one_line(tmp_path):
    """torch.export's C++ writer aborted the process on ENOSPC (rc -6, a C++ stack)."""
    from tests.danet.conftest import _mount_tmpfs, _unmount

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=1m"):
        pytest.skip("a tmpfs cannot be mounted here")
    try:
        checkpoint = save_checkpoint(tmp_path / "m.pt", tiny_model())
        done = subprocess.run([sys.executable, "-m", "danet", "export", "--checkpoint", str(checkpoint),
                               "--device", "cpu", "--format", "torch-export", "--fixed-size", "--size", "32",
                               "32", "--output", str(disk / "m.pt2")],
                              cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert _one_line(done.stderr) and "cannot write" in done.stderr
        assert "disk full (ENOSPC)" in done.stderr
        assert list(disk.iterdir()) == []
    finally:
        _unmount(disk)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton backend runs on this machine")
def test_a_forced_triton_backend_on_a_cpu_machine_is_one_line(tmp_path, monkeypatch, capsys):
    checkpoint, _ = _inference_files(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("DANET_KERNELS_BACKEND", "triton")
    with danet_kernels.use_backend("triton"):
        assert cli_main(["eval", "--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert _one_line(err) and "DANET_KERNELS_BACKEND=triton, but the Triton kernels cannot run" in err
        assert cli_main(["train", "-o", str(tmp_path / "run"), "--set", *TINY, "train.iters=1"]) == 2
        assert "unset DANET_KERNELS_BACKEND" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pam_module_says_in_dim_must_be_at_least_8_when_built():
    with pytest.raises(ValueError, match=r"PAM_Module: in_dim must be >= 8 .*got 4"):
        danet_kernels.PAM_Module(4)
    danet_kernels.PAM_Module(8)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_ddp_peer_killed_is_named_in_one_line_by_the_survivor(tmp_path):
    """kill -9 of rank 1: rank 0 died of gloo's "Connection reset by peer" traceback."""
    run, port = tmp_path / "run", _free_port()
    procs = []
    for rank in range(2):
        env = {**subprocess_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DANET_KERNELS_BACKEND": "torch"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "danet", "train", "-o", str(run), "--set", *TINY, "data.train_samples=64",
             "train.iters=100000", "train.checkpoint_interval=2", "train.val_interval=0"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        log = run / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (log.exists() and log.read_text().count("\n") >= 3):
            assert procs[0].poll() is None and time.monotonic() < deadline, procs[0].communicate(timeout=30)
            time.sleep(0.1)
        procs[1].kill()
        _, err = procs[0].communicate(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
    assert procs[0].returncode == 1, err
    lines = [line for line in err.splitlines() if "danet train:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"rank 0 lost a peer: rank 1 (PID {procs[1].pid} on {socket.gethostname()}) is gone" in lines[0]
    assert load_checkpoint(run / LAST)["iteration"] >= 2  # intact


# ---------------------------------------------------------------- messages that name the problem


def test_a_checkpoint_that_is_a_device_or_a_fifo_says_so(tmp_path, capsys):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    for path, kind in ((Path("/dev/zero"), "a character device"), (fifo, r"a FIFO \(named pipe\)")):
        assert cli_main(["eval", "--checkpoint", str(path), "--device", "cpu"]) == 2
        assert re.search(rf"file {re.escape(str(path))} is {kind}, not a file", capsys.readouterr().err)
        assert cli_main(["train", "--resume", str(path)]) == 2
        assert re.search(rf"is {kind}, not a file", capsys.readouterr().err)


def test_resuming_with_another_backbone_is_one_line_naming_it(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path / "run")
    assert cli_main(["train", "--resume", str(run), "--set", "model.backbone=resnet18"]) == 2
    err = capsys.readouterr().err
    assert _one_line(err) and "cannot resume with a changed model.backbone (resnet_tiny -> resnet18)" in err


def test_a_rank_stalled_inside_a_collective_is_named():
    """Every rank had reported the same progress: the message said so, not which rank stalled."""
    store = torch.distributed.HashStore()
    progress = Progress(DistributedContext(rank=0, world_size=2))
    progress.store = store
    for rank in range(2):
        store.set(f"danet/progress/{rank}", json.dumps([5, "step 3", time.time()]))
    store.set("danet/alive/0", json.dumps([socket.gethostname(), os.getpid(), time.time()]))
    store.set("danet/alive/1", json.dumps(["node7", 4242, time.time() - 30]))
    message = progress.describe_stall()
    assert message.startswith("rank 1 (PID 4242 on node7) has given no sign of life for 30 s")
    assert "every rank had started step 3" in message
