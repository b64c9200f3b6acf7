"""The report's plots: real PNGs of a sensible size that show what they claim to show."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import finetune
from finetune.inference.evaluate import Evaluation
from finetune.reporting.figures import compare_figure, learning_curves, per_class_figure, save_png
from finetune.training.loop import EpochResult


def _png(path: Path, width: tuple[int, int], height: tuple[int, int]) -> Image.Image:
    """Open ``path`` as a PNG and check its size lies in the given ranges (pixels)."""
    with Image.open(path) as image:
        image.load()
    assert image.format == "PNG"
    assert width[0] <= image.width <= width[1], image.size
    assert height[0] <= image.height <= height[1], image.size
    assert np.asarray(image.convert("L")).std() > 5  # something is drawn
    return image


def _probe_history() -> tuple[EpochResult, ...]:
    """What a probe records: one pass, no learning rate, no EMA."""
    return (EpochResult(1, 0.2, 0.95, 0.4, 0.85, 0.0, 1.5, True, 0.10),)


def test_learning_curves_show_loss_accuracy_gap_lr_and_ema(
    report_run: finetune.FitResult, tmp_path: Path
) -> None:
    figure = learning_curves(report_run.history, "top")
    loss_ax, acc_ax, lr_ax = figure.axes  # the LR has an axis of its own
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == [
        "train", "val", "val (EMA weights)"]  # fmt: skip
    labels = [t.get_text() for t in lr_ax.get_legend().get_texts()]
    assert labels[:4] == ["train", "val", "train/val gap", "val (EMA weights)"]
    assert labels[-1] == "head lr (right axis)" and labels[-2].startswith("best: ")
    assert lr_ax.get_yscale() == "log"
    epochs = [r.epoch for r in report_run.history]
    assert list(acc_ax.lines[1].get_xdata()) == epochs
    assert list(acc_ax.lines[1].get_ydata()) == [r.val_acc for r in report_run.history]
    _png(save_png(figure, tmp_path / "curves.png"), (900, 1400), (350, 600))


def test_a_probe_shows_points_without_an_lr_axis(tmp_path: Path) -> None:
    figure = learning_curves(_probe_history())
    assert len(figure.axes) == 2
    assert "one feature pass (probe)" in figure._suptitle.get_text()
    _png(save_png(figure, tmp_path / "probe.png"), (900, 1400), (350, 600))


def test_per_class_bars_are_each_class_accuracy(tmp_path: Path) -> None:
    classes = ("bag", "coat", "sneaker")
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 1, 2, 1, 0, 2, 2])
    evaluation = Evaluation(classes, tuple(Path(f"{i}.png") for i in range(8)), labels,
                            np.eye(3)[predicted], top_k=1)  # fmt: skip
    figure = per_class_figure(evaluation)
    bars = figure.axes[0].patches
    assert [b.get_width() for b in bars] == pytest.approx([0.5, 0.5, 1.0])
    texts = {t.get_text() for t in figure.axes[0].texts}
    assert {"2/4", "1/2", "2/2"} <= texts
    _png(save_png(figure, tmp_path / "per-class.png"), (400, 900), (150, 500))


def test_compare_overlays_one_curve_per_run(report_run: finetune.FitResult, tmp_path: Path) -> None:
    figure = compare_figure([("top", report_run.history), ("probe", _probe_history())])
    acc_ax, loss_ax = figure.axes
    curves = [line for line in acc_ax.lines if line.get_label() in ("top", "probe")]
    assert [len(line.get_xdata()) for line in curves] == [len(report_run.history), 1]
    assert len([line for line in loss_ax.lines if not line.get_label().startswith("_")]) == 2
    assert math.isclose(curves[1].get_ydata()[0], 0.85)
    _png(save_png(figure, tmp_path / "compare.png"), (900, 1400), (350, 650))
