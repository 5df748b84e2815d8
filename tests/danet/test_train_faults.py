"""danet train under faults: signals with workers, resume into the right place, divergence, bad
checkpoints and configs, full and read-only disks. Subprocesses are bounded by timeouts."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from danet.cli import main as cli_main
from danet.config import Config, config_to_dict
from danet.io.checkpoint import BEST, LAST, LAST_GOOD, atomic_save, load_checkpoint, read_file
from danet.training.resume import check_stored_config
from danet.training.trainer import NonFiniteLossError, train
from tests.danet.training_helpers import REPO, TINY, records, subprocess_env, tiny_config


def _train_iterations(run_dir: Path) -> list[int]:
    return [r["iteration"] for r in records(run_dir) if r["type"] == "train"]


def _stop_at(iteration: int):
    return lambda it, model: it == iteration


# ---------------------------------------------------------------- where a resumed run writes


def test_resume_writes_where_the_checkpoint_is_not_where_its_config_says(tmp_path):
    """cp -r A B && danet train --resume B must not touch A (the stored train.output names A)."""
    a, b, c = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    train(tiny_config(a, "train.iters=3"), on_step=_stop_at(1))
    shutil.copytree(a, b)
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    assert cli_main(["train", "--resume", str(b)]) == 0
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before
    assert load_checkpoint(b / LAST)["iteration"] == 3
    assert yaml.safe_load((b / "config.yaml").read_text())["train"]["output"] == str(b)
    assert _train_iterations(b) == [1, 2, 3]
    # an explicit --output: the continuation goes there, with the log up to the checkpoint
    assert cli_main(["train", "--resume", str(a), "--output", str(c)]) == 0
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before
    assert load_checkpoint(c / LAST)["iteration"] == 3 and _train_iterations(c) == [1, 2, 3]
    # ... but not into a directory holding another run
    assert cli_main(["train", "--resume", str(a), "--output", str(b)]) == 2
    assert load_checkpoint(b / LAST)["iteration"] == 3


def test_resume_reads_the_checkpoint_once(tmp_path, monkeypatch):
    """danet train --resume reads last.pt (hash, unpickle, finite check) once: config and state."""
    train(tiny_config(tmp_path, "train.iters=2"), on_step=_stop_at(1))
    reads = []

    def counted_read(path, *args, **kwargs):
        reads.append(Path(path))
        return read_file(path, *args, **kwargs)

    monkeypatch.setattr("danet.io.checkpoint.read_file", counted_read)
    assert cli_main(["train", "--resume", str(tmp_path)]) == 0
    assert reads.count(tmp_path / LAST) == 1
    assert load_checkpoint(tmp_path / LAST)["iteration"] == 2


def test_metrics_log_is_truncated_to_the_resumed_iteration(tmp_path):
    """A crash after iteration 5 (last.pt at 4): the resumed run redoes 5 and logs it once."""

    def crash(iteration, model):
        if iteration == 5:
            raise RuntimeError("simulated crash")

    cfg = tiny_config(tmp_path, "train.iters=8", "train.checkpoint_interval=2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, on_step=crash)
    assert load_checkpoint(tmp_path / LAST)["iteration"] == 4
    assert _train_iterations(tmp_path) == [1, 2, 3, 4, 5]
    train(tiny_config(tmp_path, "train.iters=8", "train.checkpoint_interval=2"), resume=tmp_path)
    assert _train_iterations(tmp_path) == list(range(1, 9))
    val = [r["iteration"] for r in records(tmp_path) if r["type"] == "val"]
    assert val == [4, 8]


def test_config_yaml_is_written_atomically(tmp_path, monkeypatch):
    train(tiny_config(tmp_path, "train.iters=2"), on_step=_stop_at(1))
    before = (tmp_path / "config.yaml").read_bytes()
    real_write_text = Path.write_text

    def half_then_full_disk(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_config(tmp_path, "train.iters=2"), resume=tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "config.yaml").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_start_leaves_no_run_directory(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli_main(["train", "--output", str(run_dir), "--set", *TINY, "data.dataset=cityscapes",
                     f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert "dataset directory not found" in capsys.readouterr().err
    assert cli_main(["train", "--output", str(run_dir), "--set", "model.backbone=resnet9"]) == 2
    assert "model.backbone must be one of" in capsys.readouterr().err
    assert cli_main(["train", "--preset", "cityscapes", "--output", str(run_dir)]) == 2
    assert "pass its directory with --set data.root=/path/to/cityscapes" in capsys.readouterr().err
    assert not run_dir.exists()


def test_bad_eval_settings_are_refused_before_training(tmp_path, capsys):
    """Not after an epoch, at the first validation: the same checks as danet eval's."""
    run_dir = tmp_path / "run"
    assert cli_main(["train", "--output", str(run_dir), "--set", *TINY, "eval.stride_ratio=1.5"]) == 2
    assert "eval.stride_ratio must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert cli_main(["train", "--print-config", "--set", "eval.mode=multiscale", "eval.scales=[]"]) == 2
    assert "eval.scales must be a non-empty list of positive numbers" in capsys.readouterr().err
    assert not run_dir.exists()


def test_print_config_validates_the_whole_config(capsys):
    assert cli_main(["train", "--print-config", "--set", "train.amp=fp8"]) == 2
    assert "train.amp must be one of none, bf16, fp16" in capsys.readouterr().err
    assert cli_main(["train", "--print-config", "--set", "data.crop_size=[64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.crop_size=[64" in err and "Traceback" not in err


# ---------------------------------------------------------------- what --resume accepts


def test_resume_of_a_file_that_is_not_a_training_state_says_what_it_is(tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    torch.save({"head.w": torch.ones(2)}, weights)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_text("epoch 3\n")
    (tmp_path / "mask.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    expected = {
        weights: r"cannot be resumed: it holds a plain state_dict .*--set model.pretrained=",
        tmp_path / "empty.pt": r"is empty \(0 bytes\): not a checkpoint",
        tmp_path / "notes.pt": "is not a checkpoint: it is a text file",
        tmp_path / "mask.png": "is not a checkpoint: it is a PNG image",
    }
    for path, message in expected.items():
        assert cli_main(["train", "--resume", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(message, err), err


def test_a_finished_run_is_extended_only_with_a_rebased_schedule(tmp_path, capsys):
    """--resume RUN --set train.iters=8 of a finished 4-iteration poly run: LR 0 from then on,
    unless the schedule is rebased; rebased, it is the schedule of a run planned for 8."""
    finished, straight = tmp_path / "finished", tmp_path / "straight"
    train(tiny_config(finished, "train.iters=4"))
    assert cli_main(["train", "--resume", str(finished)]) == 2
    assert "is finished (4 of 4 iterations" in capsys.readouterr().err
    assert cli_main(["train", "--resume", str(finished), "--set", "train.iters=8"]) == 2
    err = capsys.readouterr().err
    assert "changed train.iters" in err and "--rebase-schedule" in err
    assert cli_main(["train", "--resume", str(finished), "--set", "train.iters=8", "--rebase-schedule"]) == 0
    train(tiny_config(straight, "train.iters=8"))
    extended_lr = [r["lr"] for r in records(finished) if r["type"] == "train"]
    straight_lr = [r["lr"] for r in records(straight) if r["type"] == "train"]
    assert extended_lr[4:] == pytest.approx(straight_lr[4:], rel=1e-12) and min(extended_lr[4:]) > 0
    assert extended_lr[:4] != pytest.approx(straight_lr[:4])  # the first 4 ran on the 4-iteration schedule


def test_a_checkpoint_past_the_runs_total_is_refused(tmp_path, capsys):
    train(tiny_config(tmp_path, "train.iters=2"), on_step=_stop_at(1))
    state = load_checkpoint(tmp_path / LAST)
    state["iteration"] = 1_000_000
    atomic_save(state, tmp_path / LAST)
    assert cli_main(["train", "--resume", str(tmp_path)]) == 2
    assert "at iteration 1000000, past this run's 2 iterations" in capsys.readouterr().err


def test_a_partial_stored_config_is_refused(tmp_path, capsys):
    """A crafted config without its schedule and length would resume on defaults (240 epochs)."""
    train(tiny_config(tmp_path, "train.iters=2"), on_step=_stop_at(1))
    state = load_checkpoint(tmp_path / LAST)
    state["config"] = {"model": state["config"]["model"], "data": state["config"]["data"]}
    atomic_save(state, tmp_path / LAST)
    assert cli_main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "stored config has no optim.*, schedule.*, train.epochs, train.iters, train.batch_size" in err


def test_a_stored_config_completed_by_set_is_accepted():
    """A key missing from the stored config counts as missing only when --set does not give it."""
    stored = config_to_dict(Config())
    schedule = stored.pop("schedule")
    check_stored_config(stored, {"schedule": schedule}, Path("last.pt"))
    del schedule["gamma"]
    with pytest.raises(ValueError, match=r"last.pt's stored config has no schedule.gamma: "):
        check_stored_config(stored, {"schedule": schedule}, Path("last.pt"))


# ---------------------------------------------------------------- divergence


def test_divergence_names_the_last_checkpoint_followed_by_a_healthy_loss(tmp_path):
    """last.pt can hold finite weights that already diverged; last_good.pt must not.

    Checkpoints every 2 iterations. After step 4 the classifier is blown up (finite, 1e8x): the
    checkpoint at 4 holds it and the loss of step 5 explodes; at 6 the window is far out of its
    range; the run stops on a NaN soon after.
    """

    def diverge(iteration, model):
        with torch.no_grad():
            if iteration == 4:
                model.head.conv8[1].weight.mul_(1e8)
            if iteration == 7:  # at the latest: the loss of step 8 is NaN
                model.head.conv8[1].weight.fill_(float("nan"))

    cfg = tiny_config(tmp_path, "train.iters=12", "train.checkpoint_interval=2", "train.val_interval=0")
    with pytest.raises(NonFiniteLossError) as caught:
        train(cfg, on_step=diverge)
    message = str(caught.value)
    good, last = load_checkpoint(tmp_path / LAST_GOOD), load_checkpoint(tmp_path / LAST)
    assert good["iteration"] == 2 and last["iteration"] in (4, 6)
    assert "training stopped" in message
    assert f"Resume from {tmp_path / LAST_GOOD} (iteration 2)" in message
    assert f"{tmp_path / LAST} (iteration {last['iteration']}) is not" in message
    assert "--set optim.lr=0.005 --rebase-schedule" in message
    assert last["model"]["head.conv8.1.weight"].abs().max() > 1e6  # finite, but diverged
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert [healthy for _, _, healthy in last["loss_windows"][:2]] == [True, True]

    # continuing from it with a new LR needs the schedule rebased; then the new LR is in force
    assert cli_main(["train", "--resume", str(tmp_path / LAST_GOOD), "--set", "optim.lr=0.005"]) == 2
    assert cli_main(["train", "--resume", str(tmp_path / LAST_GOOD), "--set", "optim.lr=0.005",
                     "--rebase-schedule"]) == 0
    lrs = {r["iteration"]: r["lr"] for r in records(tmp_path) if r["type"] == "train"}
    assert sorted(lrs) == list(range(1, 13))  # the diverged iterations 3..6 were dropped and redone
    assert lrs[3] == pytest.approx(0.005 * (1 - 2 / 12) ** 0.9)
    assert load_checkpoint(tmp_path / LAST)["iteration"] == 12


# ---------------------------------------------------------------- disks


def test_a_full_disk_during_training_is_one_line_and_keeps_the_checkpoint(small_disk, capsys):
    """5 MiB: one 3.3 MB checkpoint fits, replacing it (old and new side by side) does not."""
    run_dir = small_disk / "run"
    code = cli_main(["train", "--output", str(run_dir), "--set", *TINY, "train.iters=8",
                     "train.checkpoint_interval=1", "train.val_interval=0"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1 and "disk full (ENOSPC)" in err and "the previous last.pt is intact" in err
    assert load_checkpoint(run_dir / LAST)["iteration"] == 1
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]


def test_a_read_only_output_directory_is_one_line(readonly_dir, capsys):
    assert cli_main(["train", "--output", str(readonly_dir / "run"), "--set", *TINY, "train.iters=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("danet train: error: cannot create the run directory") and err.count("\n") == 1


def test_a_long_run_name_is_refused_before_anything_runs(capsys, tmp_path):
    assert cli_main(["train", "--print-config", "--set", "name=" + "n" * 250]) == 2
    assert "name must be 1 to 234 bytes" in capsys.readouterr().err
    long_dir = tmp_path / ("d" * 250)  # a legal 250-byte directory name works
    assert cli_main(["train", "--output", str(long_dir), "--set", *TINY, "train.iters=1"]) == 0
    assert (long_dir / LAST).is_file() and (long_dir / BEST).is_file()


# ---------------------------------------------------------------- signals (subprocesses)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate(timeout=30)
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _logged(run_dir: Path, lines: int):
    log = run_dir / "metrics.jsonl"
    return lambda: log.is_file() and log.read_text().count("\n") >= lines


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_sigterm_to_the_workers_first_still_stops_with_a_checkpoint(tmp_path):
    """The process group is signalled (timeout, Slurm, containers); here the DataLoader workers
    get SIGTERM before the main process does, the worst order: they must not die of it."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "danet.cli", "train", "--output", str(run_dir), "--set", *TINY,
           "data.train_samples=64", "data.workers=2", "train.iters=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(_logged(run_dir, 2), proc, "training to start")
        _wait_for(lambda: len(_children(proc.pid)) >= 2, proc, "the DataLoader workers")
        for worker in _children(proc.pid):
            os.kill(worker, signal.SIGTERM)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 143, stderr
    assert "SIGTERM: stopped at iteration" in stderr
    assert load_checkpoint(run_dir / LAST)["iteration"] >= max(_train_iterations(run_dir))


_SLOW_SAVE_DRIVER = """
import sys, time
from pathlib import Path
import torch
import danet.cli

markers = Path(sys.argv[1])
real_save = torch.save
saves = 0

def slow_save(obj, f, *args, **kwargs):  # only checkpoints are torch.save'd in a training run
    global saves
    saves += 1
    (markers / f"saving-{saves}").touch()
    time.sleep(1.0)
    real_save(obj, f, *args, **kwargs)

torch.save = slow_save
code = danet.cli.main(sys.argv[2:])
(markers / "exiting").touch()
time.sleep(1.0)
sys.exit(code)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_during_the_final_save_and_a_late_one_change_nothing(tmp_path, sig):
    """Signal -> the stop's save starts (made slow) -> the same signal again -> the save ends,
    then another while the process exits: a complete last.pt, no temporary, 128 + signal."""
    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    cmd = [sys.executable, "-c", _SLOW_SAVE_DRIVER, str(markers), "train", "--output", str(run_dir),
           "--set", *TINY, "data.train_samples=64", "data.workers=2", "train.iters=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(_logged(run_dir, 2), proc, "training to start")
        saves_before = len(list(markers.glob("saving-*")))
        os.killpg(proc.pid, sig)
        _wait_for(lambda: len(list(markers.glob("saving-*"))) > saves_before, proc, "the stop's save")
        time.sleep(0.05)
        os.killpg(proc.pid, sig)  # during the save
        _wait_for((markers / "exiting").exists, proc, "the command to return")
        os.killpg(proc.pid, sig)  # while the process exits
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 128 + sig, stderr
    assert "the checkpoint is being written" in stderr
    ckpt = load_checkpoint(run_dir / LAST)
    assert ckpt["iteration"] >= max(_train_iterations(run_dir))
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []
