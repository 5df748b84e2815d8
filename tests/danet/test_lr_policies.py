"""danet.training.schedules: every policy equals Caffe's closed form at every iteration, warm-up included."""

import itertools
import math
import re
import warnings
from dataclasses import replace

import pytest
import torch

from danet.cli import main as cli_main
from danet.config import LR_POLICIES as POLICIES
from danet.config import ScheduleConfig, check_schedule, load_config
from danet.training.schedules import build_scheduler, lr_curve

BASE_LR, HEAD_MULT, TOTAL = 0.003, 10.0, 120


def caffe_lr(cfg: ScheduleConfig, base_lr: float, it: int, total: int) -> float:
    """Caffe's formulas (sgd_solver.cpp), with the warm-up convention of the module docstring."""
    w = cfg.warmup_iters
    if it < w:
        f = cfg.warmup_start_factor
        return base_lr * (f + (1.0 - f) * it / w)
    t, horizon = it - w, total - w
    g, p, s = cfg.gamma, cfg.power, cfg.step_size
    return {
        "fixed": lambda: base_lr,
        "step": lambda: base_lr * g ** (t // s),
        "exp": lambda: base_lr * g**t,
        "inv": lambda: base_lr * (1 + g * t) ** -p,
        "multistep": lambda: base_lr * g ** sum(m <= t for m in cfg.milestones),
        "poly": lambda: base_lr * (1 - min(t, horizon) / horizon) ** p,
        "sigmoid": lambda: base_lr / (1 + math.exp(-g * (t - s))),
    }[cfg.policy]()


def _params_for(policy: str) -> dict:
    """Parameters that make each policy move visibly within TOTAL iterations."""
    return {
        "step": dict(gamma=0.5, step_size=17),
        "exp": dict(gamma=0.97),
        "inv": dict(gamma=0.05, power=0.75),
        "multistep": dict(gamma=0.3, milestones=(10, 41, 77)),
        "poly": dict(power=0.9),
        "sigmoid": dict(gamma=-0.1, step_size=50),
    }.get(policy, {})


@pytest.mark.parametrize("warmup", [0, 1, 13])
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_matches_closed_form_for_both_groups(policy, warmup):
    cfg = ScheduleConfig(policy=policy, warmup_iters=warmup, warmup_start_factor=0.2, **_params_for(policy))
    backbone, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD(
        [{"params": [backbone], "lr": BASE_LR}, {"params": [head], "lr": BASE_LR * HEAD_MULT}], momentum=0.9
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation or call-order warnings from torch
        scheduler = build_scheduler(optimizer, cfg, TOTAL)
        for it in range(TOTAL):
            for group, base in zip(optimizer.param_groups, (BASE_LR, BASE_LR * HEAD_MULT), strict=True):
                expected = caffe_lr(cfg, base, it, TOTAL)
                assert group["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15), (policy, it)
            optimizer.step()
            scheduler.step()


def test_poly_ends_at_zero_and_warmup_reaches_base():
    cfg = ScheduleConfig(policy="poly", warmup_iters=10, warmup_start_factor=0.1)
    curve = lr_curve(cfg, 100, base_lr=1.0)
    assert curve[0] == pytest.approx(0.1)
    assert curve[10] == pytest.approx(1.0)
    assert curve[-1] == pytest.approx((1 / 90) ** 0.9)  # one iteration before the end
    assert all(a >= b for a, b in itertools.pairwise(curve[10:]))


def test_scheduler_state_round_trips_mid_run():
    """A scheduler rebuilt from its state_dict continues with the same LRs (what --resume relies on)."""
    cfg = ScheduleConfig(policy="inv", gamma=0.1, power=0.5, warmup_iters=5)
    param = torch.nn.Parameter(torch.zeros(1))
    opt_a = torch.optim.SGD([param], lr=1.0)
    sched_a = build_scheduler(opt_a, cfg, 50)
    for _ in range(20):
        opt_a.step()
        sched_a.step()
    opt_b = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched_b = build_scheduler(opt_b, cfg, 50)
    opt_b.load_state_dict(opt_a.state_dict())
    sched_b.load_state_dict(sched_a.state_dict())
    for _ in range(20):
        assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]
        for opt, sched in ((opt_a, sched_a), (opt_b, sched_b)):
            opt.step()
            sched.step()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(policy="cosine"), "unknown LR policy 'cosine'"),
        (dict(policy="poly", warmup_iters=100), "leaves no iterations"),
        (dict(policy="step", step_size=0), "step_size"),
        (dict(policy="multistep", milestones=(5, 3)), "strictly increasing"),
        (dict(warmup_iters=3, warmup_start_factor=0.0), "warmup_start_factor"),
    ],
)
def test_bad_schedule_is_a_clear_error(changes, message):
    """Refused once, before a scheduler exists: the settings by the config's own check, what needs
    the run length by build_scheduler."""
    cfg = replace(ScheduleConfig(), **changes)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=message):
        check_schedule(cfg)
        build_scheduler(optimizer, cfg, 100)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["schedule.policy=step", "schedule.step_size=0"], "schedule.step_size must be >= 1 for the step"),
        (["schedule.policy=multistep", "schedule.milestones=[5, 3]"],
         "schedule.milestones must be strictly increasing"),
        (["schedule.warmup_iters=3", "schedule.warmup_start_factor=0"],
         "schedule.warmup_start_factor must be in (0, 1]"),
        (["schedule.policy=inv", "schedule.gamma=-1"], "schedule.gamma must be >= 0 for the inv policy"),
    ],
)
def test_bad_schedule_settings_are_refused_with_the_config(overrides, message):
    """--print-config refuses what training refuses: the settings need no run length."""
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(overrides=overrides)


def test_lr_plot_writes_png(tmp_path, capsys):
    out = tmp_path / "lr.png"
    status = cli_main(["lr-plot", "--policies", "poly", "step", "sigmoid", "--iters", "200", "--log",
                       "--set", "schedule.step_size=50", "schedule.warmup_iters=20", "-o", str(out)])
    assert status == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lr_plot_rejects_unknown_override(tmp_path, capsys):
    status = cli_main(["lr-plot", "--set", "schedule.gama=0.5", "-o", str(tmp_path / "x.png")])
    assert status == 2
    assert "unknown config key 'schedule.gama'" in capsys.readouterr().err


def test_lr_plot_draws_the_presets_run(tmp_path, capsys):
    """--preset cityscapes: the preset's 240 epochs of 2975 images at batch 8, every policy labelled."""
    out = tmp_path / "city.png"
    assert cli_main(["lr-plot", "--preset", "cityscapes", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "89040 iterations (240 epochs x 371 iterations: 2975 training images" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["lr-plot", "--preset", "cityscapes", "-o", str(out)]) == 2  # never overwritten silently
    assert "exists" in capsys.readouterr().err


def test_every_policy_is_told_apart_on_the_default_plot():
    from danet.config import LR_POLICIES as POLICIES
    from danet.config import ScheduleConfig
    from danet.visualization.plots import _STYLES, policy_label

    assert len({_STYLES[p] for p in POLICIES}) == len(POLICIES)  # coinciding curves stay visible
    assert policy_label(ScheduleConfig(), "multistep") == "multistep (gamma 0.1, no milestones: constant)"
    assert policy_label(ScheduleConfig(), "exp") == "exp (gamma 0.1)"
    assert policy_label(ScheduleConfig(warmup_iters=5), "fixed") == "fixed (warm-up 5)"
