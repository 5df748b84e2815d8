"""Every figure danet draws, rendered and checked as a reader would look at it: the axes show the
data's range, and no text leaves the canvas or covers another text."""

from __future__ import annotations

import itertools
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox
from PIL import Image

from danet.cli import main
from danet.config import LR_POLICIES, ScheduleConfig, load_config
from danet.data import Cityscapes
from danet.evaluation.metrics import ConfusionMatrix
from danet.training.schedules import fit_to_run
from danet.visualization.plots import confusion_figure
from tests.danet.training_helpers import save_checkpoint, tiny_model


def _drawn_texts(fig: Figure) -> tuple[list[tuple[Text, Bbox]], Bbox]:
    """Every non-empty text that a draw of ``fig`` renders, with its extent in display pixels, and
    matplotlib's tight bounding box of the figure (pixels). Recorded at Text.draw: a tick label
    outside the axis' limits is a Text too, but is never drawn."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    drawn: list[Text] = []
    original = Text.draw

    def recording(text: Text, renderer_: object) -> None:
        original(text, renderer_)
        if text.get_visible() and text.get_text().strip():
            drawn.append(text)

    with mock.patch.object(Text, "draw", recording):
        fig.draw(renderer)
    tight = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # inches -> pixels
    return [(text, text.get_window_extent(renderer)) for text in dict.fromkeys(drawn)], tight


def assert_readable(fig: Figure) -> None:
    """No text outside the canvas (matplotlib's tight bounding box inside the figure's), none over another."""
    texts, tight = _drawn_texts(fig)
    canvas = fig.bbox
    assert tight.x0 >= canvas.x0 - 1 and tight.y0 >= canvas.y0 - 1, (tight, canvas)
    assert tight.x1 <= canvas.x1 + 1 and tight.y1 <= canvas.y1 + 1, (tight, canvas)
    outside = [t.get_text() for t, box in texts
               if box.x0 < canvas.x0 - 1 or box.y0 < canvas.y0 - 1 or box.x1 > canvas.x1 + 1
               or box.y1 > canvas.y1 + 1]
    assert outside == [], f"texts past the canvas: {outside}"
    overlapping = [(a.get_text(), b.get_text()) for (a, box_a), (b, box_b) in itertools.combinations(texts, 2)
                   if _overlap(box_a, box_b) > 4.0]
    assert overlapping == [], f"texts over each other: {overlapping[:5]}"


def _overlap(a: Bbox, b: Bbox) -> float:
    """Shared area of two boxes in square pixels."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures the commands save (each still written to its file)."""
    figures: list[Figure] = []
    original = Figure.savefig

    def recording(fig: Figure, *args: object, **kwargs: object) -> None:
        figures.append(fig)
        original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return figures


# ------------------------------------------------------------------------------ the LR policies


@pytest.mark.parametrize("log", [True, False])
def test_lr_plot_of_a_long_run_keeps_every_policy_in_view(log: bool, tmp_path: Path,
                                                          saved_figures: list[Figure]) -> None:
    """`danet lr-plot --preset cityscapes --log` (the README's) at a tenth of its 89,040 iterations:
    every policy spans the plot; ScheduleConfig's defaults, meant for ~1000 iterations, made exp
    and sigmoid reach 1e-300 and squeezed every other curve into a flat line at the top."""
    iters, base = 8904, load_config("cityscapes").optim.lr
    assert main(["lr-plot", "--preset", "cityscapes", "--iters", str(iters), "--output",
                 str(tmp_path / "lr.png"), *(["--log"] if log else [])]) == 0
    (fig,) = saved_figures
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert high <= 2 * base * 1.01 and (low >= base * 1e-6 / 2 if log else low == 0.0)
    assert ax.get_xlim() == (0.0, iters)
    assert len(ax.get_lines()) == len(LR_POLICIES)
    for line in ax.get_lines():
        values = np.asarray(line.get_ydata())
        assert ((values >= low) & (values <= high)).mean() > 0.95, line.get_label()
        if log:  # and each curve's bulk above the bottom decade of the log axis
            assert np.median(values) > low * 10, line.get_label()
    labels = [line.get_label() for line in ax.get_lines()]
    assert "poly (power 0.9): the config's" in labels
    assert any(label.startswith("step (gamma 0.1, step_size 2968); step_size fitted") for label in labels)
    assert_readable(fig)


def test_fitted_policies_keep_what_the_config_sets() -> None:
    fitted, names = fit_to_run(ScheduleConfig(), "sigmoid", 1000)
    assert (fitted.policy, fitted.step_size, fitted.gamma) == ("sigmoid", 500, -0.01)
    assert names == ["gamma", "step_size"]
    mine, names = fit_to_run(ScheduleConfig(step_size=50, gamma=0.5), "step", 1000)
    assert (mine.step_size, mine.gamma, names) == (50, 0.5, [])
    exp, _ = fit_to_run(ScheduleConfig(warmup_iters=100), "exp", 1100)
    assert exp.gamma ** 1000 == pytest.approx(0.01)  # the fitted decay runs after the warm-up


# ------------------------------------------------------------------------------ the confusion matrix


@pytest.mark.parametrize("classes", [2, 19])
def test_confusion_matrix_is_readable_with_numbers_in_its_cells(classes: int) -> None:
    """Cityscapes' 19 names and a long title: nothing clipped ("pixel" of the colour bar's label),
    the title clear of the colour bar's "1.0", and each cell's share written in it."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, classes, (64, 64), generator=generator)
    noise = torch.randint(0, classes, (64, 64), generator=generator)
    prediction = torch.where(torch.rand(64, 64, generator=generator) < 0.7, target, noise)
    matrix = ConfusionMatrix(classes)
    matrix.update(prediction, target)
    names = list(Cityscapes.CLASS_NAMES[:classes])
    title = ("checkpoint_best.pt on cityscapes/val: protocol=release mode=sliding crop=768 stride=512 "
             "base_size=2048 flip=True")
    fig = confusion_figure(matrix, names, title)
    ax = fig.axes[0]
    assert ax.get_xlim() == (-0.5, classes - 0.5) and ax.get_ylim() == (classes - 0.5, -0.5)
    colour_bar = fig.axes[1]
    assert colour_bar.get_ylim() == (0.0, 100.0)
    cells = [t for t in ax.texts if t.get_text()]
    assert len(cells) == classes * classes
    percent = (100 * matrix.counts() / matrix.counts().sum(1, keepdim=True)).numpy()
    assert [t.get_text() for t in cells[:2]] == [f"{percent[0, 0]:.0f}", f"{percent[0, 1]:.0f}"]
    assert_readable(fig)


def test_eval_confusion_matrix_figure_is_readable(tmp_path: Path, saved_figures: list[Figure]) -> None:
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", tiny_model())
    assert main(["eval", "--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress", "--workers",
                 "0", "--confusion-matrix", str(tmp_path / "confusion.png")]) == 0
    (fig,) = saved_figures
    assert_readable(fig)


# ------------------------------------------------------------------------------ the attention figure


@pytest.mark.parametrize(("height", "width", "points"), [(48, 64, 2), (120, 40, 1), (40, 160, 5)])
def test_attention_figure_is_readable(height: int, width: int, points: int, tmp_path: Path,
                                      saved_figures: list[Figure]) -> None:
    """Landscape, portrait and panorama images: each panel shows its whole image, no text clipped."""
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", tiny_model())
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image)
    chosen = [f"{(7 * i) % width},{(5 * i) % height}" for i in range(points)]
    assert main(["attention", str(image), "--points", *chosen, "--checkpoint", str(checkpoint), "--device",
                 "cpu", "--output", str(tmp_path / "attention.png")]) == 0
    (fig,) = saved_figures
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 + points + 4
    for ax in panels:
        assert ax.get_xlim() == (-0.5, width - 0.5) and ax.get_ylim() == (height - 0.5, -0.5)
    assert_readable(fig)
