"""danet.training.trainer: the synthetic default learns; resume is exact; checkpoints survive SIGTERM, NaN."""

import contextlib
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from danet.cli import main as cli_main
from danet.config import load_config
from danet.io.checkpoint import BEST, LAST, LAST_GOOD, load_checkpoint
from danet.training.data import plan_batches
from danet.training.trainer import NonFiniteLossError, train
from tests.danet.training_helpers import REPO, TINY, subprocess_env, tiny_config
from tests.danet.training_helpers import records as _records


def _majority_class_miou(cfg) -> float:
    """mIoU of always predicting the most frequent class of the validation split: the 'chance' bar."""
    from danet.data import build_dataset

    val = build_dataset("synthetic", None, "val", num_samples=cfg.data.val_samples,
                        image_size=cfg.data.image_size)
    counts = torch.zeros(4)
    for i in range(len(val)):
        counts += torch.bincount(val[i][1].flatten(), minlength=4)[:4].float()
    # predicting class c everywhere: IoU(c) = freq(c), other present classes 0
    present = int((counts > 0).sum())
    return float(counts.max() / counts.sum()) / present


def test_synthetic_default_learns(tmp_path):
    """The default recipe, shortened (384 iterations at 48 px): mIoU well above chance.

    Chance here is predicting the background everywhere: mIoU = freq(background) / 4 classes,
    about 0.21. The model must find the shapes and tell the two scene types apart; this run
    measured 0.63 (the full default, 1280 iterations at 64 px, reaches about 0.75).
    """
    cfg = load_config("synthetic", overrides=[
        f"train.output={tmp_path}", "train.progress=false", "data.image_size=48", "data.base_size=48",
        "data.crop_size=48", "train.epochs=6", "train.val_interval=0", "data.val_samples=32",
        "train.device=cpu",
    ])
    result = train(cfg)
    chance = _majority_class_miou(cfg)
    print(f"synthetic: mIoU {result.metrics['mIoU']:.3f} (majority-class mIoU {chance:.3f}), "
          f"pixAcc {result.metrics['pixAcc']:.3f}, IoU {result.metrics['IoU']}")
    assert chance < 0.3
    assert result.metrics["mIoU"] > 0.45  # measured 0.63 (0.21 for the majority class)
    assert result.losses[-1] < result.losses[0] / 2
    assert (tmp_path / LAST).is_file() and (tmp_path / BEST).is_file()
    records = _records(tmp_path)
    assert {r["type"] for r in records} == {"train", "val"}
    train_records = [r for r in records if r["type"] == "train"]
    assert all(r["lr_head"] == pytest.approx(10 * r["lr"]) for r in train_records)  # the head at 10x
    assert {"loss_sum", "loss_pam", "loss_cam", "images_per_s"} <= train_records[0].keys()


@pytest.mark.parametrize(
    ("stop_at", "extra", "interrupted_only"),
    [(3, [], ["data.workers=2"]), (4, [], []), (5, ["train.accum_steps=2"], [])],
)
def test_resume_matches_uninterrupted_run(tmp_path, stop_at, extra, interrupted_only):
    """8 iterations straight vs. stopped after ``stop_at`` and resumed: identical bits.

    3: mid-epoch, and the interrupted run loads data in two worker processes (augmentation must
    not depend on them); 4: after an epoch's last step but before its validation; 5 with
    gradient accumulation. Dropout, augmentation and the data order all draw random numbers.
    """
    common = ["train.iters=8", *extra]
    straight = train(tiny_config(tmp_path / "a", *common))

    cfg_b = tiny_config(tmp_path / "b", *common, *interrupted_only)
    stopped = train(cfg_b, on_step=lambda it, model: it == stop_at)
    assert stopped.stopped_early and stopped.iteration == stop_at
    assert load_checkpoint(tmp_path / "b" / LAST)["iteration"] == stop_at
    resumed = train(cfg_b, resume=tmp_path / "b")
    assert resumed.iteration == straight.iteration == 8

    assert resumed.losses == straight.losses[stop_at:]
    state_a, state_b = straight.model.state_dict(), resumed.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    ckpt_a, ckpt_b = load_checkpoint(tmp_path / "a" / LAST), load_checkpoint(tmp_path / "b" / LAST)
    assert ckpt_a["scheduler"]["_last_lr"] == ckpt_b["scheduler"]["_last_lr"]
    assert ckpt_a["best_miou"] == ckpt_b["best_miou"]
    # the resumed run appended to the same log: every iteration logged once
    iterations = [r["iteration"] for r in _records(tmp_path / "b") if r["type"] == "train"]
    assert iterations == list(range(1, 9))


@pytest.mark.parametrize("checkpoint_interval", [1, 2])
def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, checkpoint_interval):
    """Parameters turn NaN after step 3: the run stops, last.pt still holds step 2's finite state.

    Interval 1: the save at step 3 refuses the NaN state. Interval 2: step 4's loss is NaN.
    """

    def poison(iteration, model):
        if iteration == 3:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    cfg = tiny_config(tmp_path, "train.iters=12", f"train.checkpoint_interval={checkpoint_interval}")
    with pytest.raises(NonFiniteLossError, match=r"Resume from .*last_good\.pt \(iteration 2\)"):
        train(cfg, on_step=poison)
    for name in (LAST, LAST_GOOD):
        ckpt = load_checkpoint(tmp_path / name)
        assert ckpt["iteration"] == 2
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_checkpoint_then_resume(tmp_path, sig):
    """Preemption (SIGTERM) or a first Ctrl-C: the current step ends, last.pt is written, exit 128+sig."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "danet.cli", "train", "--output", str(run_dir),
           "--set", *TINY, "train.iters=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        log = run_dir / "metrics.jsonl"
        while not (log.is_file() and log.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.2)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, stderr
    assert signal.Signals(sig).name in stderr and "--resume" in stderr
    ckpt = load_checkpoint(run_dir / LAST)
    logged = max(r["iteration"] for r in _records(run_dir))
    assert ckpt["iteration"] >= logged >= 2
    assert {"optimizer", "scheduler", "rng", "config", "epoch", "iteration_in_epoch"} <= ckpt.keys()

    # and it resumes from there through the command line
    stop_after_one = {"count": 0}

    def one_more(iteration, model):
        stop_after_one["count"] += 1
        return True

    cfg = load_config("synthetic", overrides=[*TINY, "train.iters=100000", f"train.output={run_dir}"])
    result = train(cfg, resume=run_dir, on_step=one_more)
    assert result.iteration == ckpt["iteration"] + 1 and stop_after_one["count"] == 1


def test_existing_run_dir_is_not_overwritten(tmp_path):
    train(tiny_config(tmp_path, "train.iters=1"))
    before = (tmp_path / LAST).read_bytes()
    with pytest.raises(ValueError, match="already holds"):
        train(tiny_config(tmp_path, "train.iters=1"))
    assert (tmp_path / LAST).read_bytes() == before
    train(tiny_config(tmp_path, "train.iters=1"), overwrite=True)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="is not a directory"):
        train(tiny_config(tmp_path / "file", "train.iters=1"))
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize(
    "knobs",
    [
        ["train.amp=bf16", "train.channels_last=true", "train.activation_checkpointing=true",
         "optim.grad_clip=1.0", "model.aux=true"],
        ["train.amp=fp16", "train.accum_steps=2", "optim.name=adamw", "optim.lr=0.001",
         "schedule.warmup_iters=2", "schedule.policy=step", "schedule.step_size=1"],
    ],
)
def test_memory_and_precision_knobs_train(tmp_path, knobs):
    result = train(tiny_config(tmp_path, "train.iters=3", *knobs))
    assert result.iteration == 3
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert 0.0 <= result.metrics["mIoU"] <= 1.0


def test_matmul_precision_is_set_for_the_run(tmp_path, monkeypatch):
    """train.matmul_precision reaches torch (which the kernels' fp32 dot precision follows)."""
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    train(tiny_config(tmp_path, "train.iters=1", "train.matmul_precision=high"))
    assert calls == ["high"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.accum_steps=3"], "not divisible"),
        (["data.train_samples=2"], "do not fill one global batch"),
        (["train.amp=fp8"], "train.amp must be one of"),
        (["optim.name=lamb"], "optim.name must be one of sgd, adamw"),
        (["schedule.policy=cosine"], "schedule.policy must be one of"),
    ],
)
def test_bad_training_settings_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_config(tmp_path, *overrides))


def test_plan_splits_global_batch():
    cfg = load_config("cityscapes", overrides=["train.accum_steps=2"])
    plan = plan_batches(cfg, num_train=2975, world_size=4)  # ceil(2975 / 4) = 744 per process
    assert (plan.micro_batch, plan.accum_steps, plan.iters_per_epoch) == (1, 2, 372)
    assert plan.total_iters == 240 * 372


def test_cli_print_config_and_errors(tmp_path, capsys):
    assert cli_main(["train", "--preset", "cityscapes", "--set", "optim.lr=0.01", "--print-config",
                     "--set", "train.epochs=3"]) == 0  # repeated --set flags add up
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["optim"]["lr"], printed["train"]["epochs"]) == (0.01, 3)
    assert printed["data"]["dataset"] == "cityscapes"
    assert cli_main(["train", "--set", "train.epohcs=2"]) == 2
    assert "unknown config key 'train.epohcs'" in capsys.readouterr().err
    assert cli_main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_seeded_augmentation_is_a_function_of_seed_epoch_index():
    from danet.data import SyntheticShapes, train_transforms
    from danet.training.data import SeededAugmentation

    base = SyntheticShapes("train", train_transforms(32, 24, (0.5,) * 3, (0.25,) * 3), num_samples=4,
                           image_size=32)
    data = SeededAugmentation(base, seed=7)
    torch.manual_seed(123)
    outside = torch.get_rng_state()
    first = data[2]
    assert torch.equal(torch.get_rng_state(), outside)  # the caller's random stream is untouched
    torch.rand(5)  # whatever else draws in between does not matter
    again = data[2]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    data.set_epoch(1)
    other_epoch = [data[2] for _ in range(2)]
    assert torch.equal(other_epoch[0][0], other_epoch[1][0])
    assert not all(torch.equal(data[i][0], SeededAugmentation(base, seed=7)[i][0]) for i in range(4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("knobs", [["train.amp=bf16", "train.channels_last=true", "train.compile=true"],
                                   ["train.amp=fp16", "train.activation_checkpointing=true"]])
def test_cuda_training_knobs(tmp_path, knobs):
    cfg = tiny_config(tmp_path, "train.iters=4", "train.device=cuda", *knobs)
    result = train(cfg)
    assert result.iteration == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert next(result.model.parameters()).is_cuda


def test_metrics_log_writes_json_lines_and_tensorboard_is_optional(tmp_path):
    from danet.training.run_dir import MetricsLog

    try:
        import tensorboard  # noqa: F401

        expectation = contextlib.nullcontext()
    except ImportError:
        expectation = pytest.warns(UserWarning, match="tensorboard package is not installed")
    with expectation:
        log = MetricsLog(tmp_path, enabled=True, tensorboard=True)
    log.write("val", 7, mIoU=0.5, IoU=[0.25, float("nan")])
    log.close()
    (record,) = _records(tmp_path)
    assert (record["type"], record["iteration"]) == ("val", 7)
    assert (record["mIoU"], record["IoU"]) == (0.5, [0.25, None])
    silent = MetricsLog(tmp_path / "other", enabled=False)
    silent.write("train", 1, loss=1.0)
    silent.close()
    assert not (tmp_path / "other").exists()  # ranks other than 0 write nothing
