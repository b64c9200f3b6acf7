"""Numbers -> pictures: the PNG plots of a run's report and of ``finetune compare``.

Every function returns a matplotlib :class:`~matplotlib.figure.Figure` built without pyplot, so
nothing depends on a display or on global state (headless, thread-safe); :func:`save_png`
writes one. The confusion matrix and the mistakes grid are :mod:`finetune.inference.evaluate`'s own
(``Evaluation.save``); the per-class bars here sit beside them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.files import atomic_write
from finetune.training.loop import EpochResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from finetune.inference.evaluate import Evaluation

__all__ = ["compare_figure", "learning_curves", "per_class_figure", "save_png"]


def _present(values: Sequence[float]) -> bool:
    """Whether a metrics.csv column holds any number (EMA columns are nan without --ema)."""
    return any(not math.isnan(v) for v in values)


def learning_curves(history: Sequence[EpochResult], title: str = "") -> Figure:
    """Train and val loss (left), train and val accuracy with the train/val gap shaded between
    them and the head learning rate on a second axis (right), per epoch; the EMA weights' val
    loss and accuracy when the run kept an average, and the best epoch marked.

    A probe's single "epoch" (one feature pass) shows as points, not a curve.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.0))
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [r.epoch for r in history]
    marker = "o" if len(history) <= 30 else None
    best = [r for r in history if r.best]

    loss_ax.plot(epochs, [r.train_loss for r in history], marker=marker, label="train")
    loss_ax.plot(epochs, [r.val_loss for r in history], marker=marker, label="val")
    ema_loss = [r.ema_val_loss for r in history]
    if _present(ema_loss):
        loss_ax.plot(epochs, ema_loss, marker=marker, linestyle="--", label="val (EMA weights)")
    loss_ax.set_title("loss (cross-entropy)", fontsize=10)

    train_acc = [r.train_acc for r in history]
    val_acc = [r.val_acc for r in history]
    acc_ax.plot(epochs, train_acc, marker=marker, label="train")
    acc_ax.plot(epochs, val_acc, marker=marker, label="val")
    if len(history) > 1:
        acc_ax.fill_between(epochs, train_acc, val_acc, color="tab:red", alpha=0.15,
                            label="train/val gap")  # fmt: skip
    ema_acc = [r.ema_val_acc for r in history]
    if _present(ema_acc):
        acc_ax.plot(epochs, ema_acc, marker=marker, linestyle="--", label="val (EMA weights)")
    if best:
        b = best[-1]
        acc_ax.plot([b.epoch], [b.val_acc], marker="*", markersize=14, color="gold",
                    markeredgecolor="black", linestyle="none",
                    label=f"best: {b.val_acc:.3f} (epoch {b.epoch})")  # fmt: skip
        loss_ax.axvline(b.epoch, color="grey", linestyle=":", linewidth=1)
    acc_ax.set_ylim(-0.02, 1.02)
    acc_ax.set_title(f"accuracy (gap at the end {history[-1].gap:+.3f})", fontsize=10)

    lines, labels = acc_ax.get_legend_handles_labels()
    lrs = [r.lr for r in history]
    top = acc_ax  # the legend goes on the axes drawn last, or the LR line would cross it
    if any(lr > 0 for lr in lrs):
        lr_ax = top = acc_ax.twinx()
        (line,) = lr_ax.plot(epochs, lrs, color="grey", linestyle="-.", linewidth=1)
        lr_ax.set_yscale("log")
        lr_ax.set_ylabel("head learning rate", fontsize=8, color="grey")
        lr_ax.tick_params(labelsize=7, colors="grey")
        lines, labels = [*lines, line], [*labels, "head lr (right axis)"]
    top.legend(lines, labels, fontsize=7, loc="lower right")
    loss_ax.legend(fontsize=7)
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs) == 1:
            ax.set_xlim(0.5, 1.5)
    if len(history) == 1 and history[0].lr == 0:
        title = (title + ": " if title else "") + "one feature pass (probe), so points, no curve"
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def per_class_figure(evaluation: Evaluation, title: str = "") -> Figure:
    """Accuracy (recall) per class as horizontal bars, each labelled right/total, with the
    overall accuracy as a line: which classes the model gets wrong."""
    from matplotlib.figure import Figure

    classes = evaluation.classes
    confusion = evaluation.confusion()
    totals = confusion.sum(1)
    right = confusion.diagonal()
    accuracy = [r / t if t else 0.0 for r, t in zip(right, totals, strict=True)]
    fig = Figure(figsize=(6.0, 0.9 + 0.32 * len(classes)))
    ax = fig.subplots()
    rows = range(len(classes))
    colours = [(1 - a, 0.25 + 0.5 * a, 0.3) for a in accuracy]  # red (0) to green (1)
    ax.barh(rows, accuracy, color=colours)
    for row, (r, t) in enumerate(zip(right, totals, strict=True)):
        ax.text(min(accuracy[row], 1.0) + 0.01, row, f"{r}/{t}", va="center", fontsize=7)
    ax.axvline(evaluation.accuracy, color="black", linestyle="--", linewidth=1,
               label=f"overall {evaluation.accuracy:.3f}")  # fmt: skip
    ax.set_yticks(list(rows), classes, fontsize=8)
    ax.invert_yaxis()  # first class on top, as in the confusion matrix
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("accuracy (recall) on the class's images")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or f"per-class accuracy on {len(evaluation.labels)} images", fontsize=10)
    fig.tight_layout()
    return fig


def compare_figure(runs: Sequence[tuple[str, Sequence[EpochResult]]]) -> Figure:
    """Validation accuracy (left) and loss (right) per epoch of several runs, overlaid; each
    run's best epoch starred. ``runs``: (label, history) pairs."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2))
    acc_ax, loss_ax = fig.subplots(1, 2)
    for index, (label, history) in enumerate(runs):
        colour = f"C{index % 10}"
        epochs = [r.epoch for r in history]
        acc_ax.plot(epochs, [r.val_acc for r in history], marker="o", markersize=3,
                    color=colour, label=label)  # fmt: skip
        loss_ax.plot(epochs, [r.val_loss for r in history], marker="o", markersize=3,
                     color=colour, label=label)  # fmt: skip
        best = [r for r in history if r.best]
        if best:
            acc_ax.plot([best[-1].epoch], [best[-1].val_acc], marker="*", markersize=12,
                        color=colour, markeredgecolor="black")  # fmt: skip
    acc_ax.set_title("val accuracy (star: best epoch, the weights in best.pt)", fontsize=10)
    loss_ax.set_title("val loss", fontsize=10)
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_png(figure: Figure, out: str | Path, dpi: int = 110) -> Path:
    """Write ``figure`` as a PNG (its folder created); the path."""
    out = Path(out).expanduser()
    return atomic_write(
        out, lambda f: figure.savefig(f, dpi=dpi, bbox_inches="tight", format="png")
    )
