"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates"; fastai's ``lr_find``).

Train for a few dozen steps while the LR grows exponentially from ``start_lr`` to ``end_lr``,
recording the loss. The loss first stays flat (LR too small to matter), then falls, then
explodes; a good LR lies on the falling slope. The test is a hook on the training step, as
fastai's ``LRFinder`` is a callback on its one loop: :class:`LRFinder` sets the LRs before each
:class:`~finetune.training.loop.TrainStep` and records the loss after it, so the loss it sees is
the one ``fit`` trains on (same precision, layout, class weights and label smoothing).
:func:`find_lr` drives the steps; ``finetune.lr_find`` (in :mod:`finetune.pipeline`) builds the
model, optimizer groups, loader and step as ``fit`` would. (This module is not called
``lr_find`` so that importing it never hides that function.)

The suggestion is the LR of the lowest smoothed loss divided by 10, the rule of Smith and of
fastai's ``minimum`` (at the minimum the LR is already too large to train with); the steepest
descent of the loss is reported beside it.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune.errors import ConfigError, DataError, TrainingError
from finetune.files import atomic_write
from finetune.model.backbone import set_train_mode
from finetune.training.loop import Event, StepOutput, TrainStep

__all__ = [
    "MIN_STEPS",
    "LRFinder",
    "LRFinding",
    "check_range",
    "find_lr",
    "output_paths",
    "plot_lr_finding",
]

PLOT_NAME = "lr-find.png"  # the plot's name inside a folder given as -o

SMOOTHING = 0.98  # exponential smoothing of the recorded loss (with bias correction)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its minimum
MIN_STEPS = 10  # fewer steps than this draw no curve to read a learning rate from
MIN_RECORDED = 3  # losses needed before the divergence, for a minimum and a slope


@dataclass(frozen=True)
class LRFinding:
    """What the range test measured and what it suggests (head LRs; the backbone groups moved
    in proportion, keeping the strategy's LR ratios)."""

    lrs: tuple[float, ...]  # head LR at each step
    losses: tuple[float, ...]  # smoothed training loss at each step
    minimum: float  # head LR where the smoothed loss was lowest
    steepest: float  # head LR where the smoothed loss fell fastest (per log LR)
    diverged: bool  # the test stopped early because the loss exploded
    plot: Path | None = None  # the PNG of loss against LR, once drawn

    @property
    def suggestion(self) -> float:
        """The head LR to train with: ``minimum / 10``."""
        return self.minimum / 10

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``lr-find.json``)."""
        return {
            "suggestion": self.suggestion,
            "minimum": self.minimum,
            "steepest": self.steepest,
            "diverged": self.diverged,
            "lrs": list(self.lrs),
            "losses": list(self.losses),
        }


def check_range(start_lr: float, end_lr: float, steps: int) -> None:
    """Refuse a range test that cannot work, before anything is built for it.

    Raises:
        ConfigError: ``steps`` below :data:`MIN_STEPS`, or the LRs not ``0 < start < end``
            (finite).
    """
    if steps < MIN_STEPS:
        raise ConfigError(
            f"steps={steps} (--steps) is too few for a range test: it needs at least "
            f"{MIN_STEPS} steps to draw a loss curve; 100 is the usual."
        )
    for name, value in (("start_lr", start_lr), ("end_lr", end_lr)):
        if not (math.isfinite(value) and value > 0):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{name}={value:g} ({flag}) must be a positive number: the LR grows "
                "exponentially between them (the defaults are 1e-7 and 10)."
            )
    if start_lr >= end_lr:
        raise ConfigError(
            f"start_lr={start_lr:g} (--start-lr) must be below end_lr={end_lr:g} (--end-lr): "
            "the LR grows from the start to the end; swap them, or e.g. --start-lr 1e-7 "
            "--end-lr 10."
        )


class LRFinder:
    """The range test as a hook on :class:`~finetune.training.loop.TrainStep`.

    Before each step it sets every optimizer group's LR on the exponential ramp, keeping the
    group's ratio to the last (head) group's LR as the strategy set it; after each step it
    records the smoothed loss and asks to stop once ``steps`` LRs are tried, or the loss is
    non-finite or above :data:`DIVERGED` times its minimum.

    Args:
        optimizer: The optimizer the steps use; its groups' LRs give the ratios.
        start_lr: The head LR of the first step.
        end_lr: The head LR of step ``steps``.
        steps: How many steps the ramp takes.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, start_lr: float, end_lr: float, steps: int
    ) -> None:
        check_range(start_lr, end_lr, steps)
        head_lr = optimizer.param_groups[-1]["lr"]
        if not head_lr > 0:
            raise ConfigError(
                f"The optimizer's last (head) group has lr {head_lr:g}; the range test keeps "
                "the other groups' ratios to it, so it must be positive (--lr)."
            )
        self.ratios = [group["lr"] / head_lr for group in optimizer.param_groups]
        self.start_lr, self.end_lr, self.steps = start_lr, end_lr, steps
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.diverged = False
        self._average, self._best = 0.0, math.inf

    def lr(self, step: int) -> float:
        """The head LR of step ``step`` (0-based) on the exponential ramp."""
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / max(1, self.steps - 1))

    def __call__(self, event: Event, step: TrainStep, out: StepOutput | None) -> bool:
        """Set the LRs before a step; record its loss after it. True: the test is over."""
        if event is Event.BEFORE_STEP:
            lr = self.lr(len(self.lrs))
            for group, ratio in zip(step.optimizer.param_groups, self.ratios, strict=True):
                group["lr"] = lr * ratio
            return False
        loss = out.loss.item()  # the range test waits for every step: it reads every loss
        if not math.isfinite(loss):
            self.diverged = True
            return True
        lr = self.lr(len(self.lrs))
        self._average = SMOOTHING * self._average + (1 - SMOOTHING) * loss
        smoothed = self._average / (1 - SMOOTHING ** (len(self.lrs) + 1))
        self.lrs.append(lr)
        self.losses.append(smoothed)
        self._best = min(self._best, smoothed)
        if len(self.lrs) > 6 and smoothed > DIVERGED * self._best:
            self.diverged = True
            return True
        return len(self.lrs) >= self.steps

    def finding(self) -> LRFinding:
        """The result of the steps so far.

        Raises:
            TrainingError: Fewer than :data:`MIN_RECORDED` finite losses: the loss diverged
                at once.
        """
        if len(self.lrs) < MIN_RECORDED:
            raise TrainingError(
                f"The loss diverged within {MIN_RECORDED} steps of the range test, at head LR "
                f"{self.lr(len(self.lrs)):.1e}: start_lr={self.start_lr:g} (--start-lr) is "
                "already too large. Give a smaller one, e.g. --start-lr 1e-7."
            )
        return LRFinding(
            lrs=tuple(self.lrs),
            losses=tuple(self.losses),
            minimum=self.lrs[int(np.argmin(self.losses))],
            steepest=_steepest(self.lrs, self.losses),
            diverged=self.diverged,
        )


def find_lr(
    step: TrainStep,
    loader: DataLoader,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    reseed: Callable[[int], None] | None = None,
    progress: bool = True,
) -> LRFinding:
    """Run the range test through ``step``, ``fit``'s training step, with an
    :class:`LRFinder` hooked on it: the head LR goes from ``start_lr`` to ``end_lr`` over
    ``steps`` steps (cycling through ``loader`` as often as needed), every other group keeping
    its ratio to it. The model's weights are changed: pass a model you will not train further
    (``finetune.lr_find`` builds a fresh one).

    Args:
        step: The training step, as ``fit`` would run it; the finder is added to its hooks.
        loader: The training batches.
        reseed: Called with 1, 2, ... before each pass over ``loader`` (each pass then has an
            order and augmentation of its own, as ``fit``'s epochs do).
        progress: Show a progress bar (only when stderr is a terminal).

    Raises:
        ConfigError: ``steps`` below :data:`MIN_STEPS`, or not ``0 < start_lr < end_lr``.
        DataError: ``loader`` gives no batch (every image failed to decode).
        TrainingError: The loss diverged within :data:`MIN_RECORDED` steps.
    """
    finder = LRFinder(step.optimizer, start_lr, end_lr, steps)
    run = replace(step, hooks=(*step.hooks, finder), stopped=False)
    set_train_mode(run.model)
    if run.net is not None:  # a view's containers are copies: their modes follow the model's
        set_train_mode(run.net)
    bar = tqdm(total=steps, desc="lr-find", unit="step", leave=False,
               disable=None if progress else True)  # fmt: skip
    try:
        for images, labels in _cycle(run, loader, reseed):
            run(images, labels)
            bar.update()
            if run.stopped:
                break
    finally:
        bar.close()
    return finder.finding()


def _cycle(
    step: TrainStep, loader: DataLoader, reseed: Callable[[int], None] | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``loader``'s batches on the device in ``step``'s layout, pass after pass, for ever."""
    for number in itertools.count(1):
        if reseed is not None:
            reseed(number)
        empty = True
        for batch in step.batches(loader):
            empty = False
            yield batch
        if empty:
            raise DataError(
                "The training images gave no batch to run the range test on: every one "
                "failed to decode. `finetune check DATA` lists the unreadable files."
            )


def _steepest(lrs: list[float], losses: list[float]) -> float:
    """The LR where the smoothed loss falls fastest against log LR, before its minimum (the
    first tenth of the steps, where the smoothing has seen few losses, is left out)."""
    start, end = max(2, len(lrs) // 10), int(np.argmin(losses)) + 1
    if end - start < 3:
        return lrs[min(start, end - 1)]
    slope = np.gradient(np.asarray(losses[start:end]), np.log(np.asarray(lrs[start:end])))
    return lrs[start + int(np.argmin(slope))]


def output_paths(out: str | Path) -> tuple[Path, Path]:
    """The plot's path and that of the numbers (the same name, ``.json``), checked before any
    training: ``out`` is the plot the user named (an existing folder: ``lr-find.png`` in it);
    the numbers' file, which the user did not name, replaces only an earlier lr-find's numbers.

    Raises:
        ConfigError: ``out`` ends in ``.json`` (the numbers' name), lies below a file, or the
            ``.json`` beside it is a file that lr-find did not write.
    """
    plot = Path(out).expanduser()
    if plot.is_dir():
        plot = plot / PLOT_NAME
    if plot.suffix.lower() == ".json":
        raise ConfigError(
            f"-o {plot}: the plot cannot be a .json file, which is where the numbers go (beside "
            "the plot, the same name with .json); give the plot a .png name."
        )
    for parent in plot.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"-o {plot} lies below {parent}, which is a file.")
            break
    numbers = plot.with_suffix(".json")
    if (numbers.exists() or numbers.is_symlink()) and not _is_lr_record(numbers):
        raise ConfigError(
            f"{numbers} exists and is not the numbers of an earlier lr-find; lr-find writes them "
            f"beside the plot ({plot.name}) and never overwrites another file: choose another "
            "-o name or move that file."
        )
    return plot, numbers


def _is_lr_record(path: Path) -> bool:
    """Whether ``path`` holds what :meth:`LRFinding.to_dict` writes (read as JSON, no more)."""
    try:
        if not path.is_file() or path.stat().st_size > 64 * 1024 * 1024:
            return False
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"suggestion", "lrs", "losses"} <= record.keys()


def plot_lr_finding(finding: LRFinding, out: str | Path, title: str = "") -> Path:
    """Loss against LR (log axis) with the suggestion, the minimum and the steepest descent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(finding.lrs, finding.losses, color="tab:blue", label="training loss (smoothed)")
    ax.set_xscale("log")
    ax.set_xlabel("head learning rate")
    ax.set_ylabel("loss")
    low, high = min(finding.losses), finding.losses[0]
    ax.set_ylim(low - 0.1 * (high - low + 1e-9), max(high, low) + 0.5 * (high - low + 1e-9))
    for lr, style, label in (
        (finding.suggestion, "-", f"suggested {finding.suggestion:.1e} (minimum / 10)"),
        (finding.minimum, ":", f"minimum {finding.minimum:.1e}"),
        (finding.steepest, "--", f"steepest {finding.steepest:.1e}"),
    ):
        ax.axvline(lr, color="tab:red", linestyle=style, linewidth=1, label=label)
    ax.legend(fontsize=8)
    ax.set_title(title or "learning-rate range test", fontsize=9)
    fig.tight_layout()
    out = atomic_write(Path(out).expanduser(), lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return out
