"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates"; fastai's ``lr_find``).

Train for a few dozen steps while the LR grows exponentially from ``start_lr`` to ``end_lr``,
recording the loss. The loss first stays flat (LR too small to matter), then falls, then
explodes; a good LR lies on the falling slope. :func:`find_lr` runs the test on a model and its
optimizer groups; ``finetune.lr_find`` (in :mod:`finetune.pipeline`) prepares them as ``fit`` would.
(This module is not called ``lr_find`` so that importing it never hides that function.)
The suggestion is the LR of the lowest smoothed loss divided by 10, the rule of Smith and of
fastai's ``minimum`` (at the minimum the LR is already too large to train with); the steepest
descent of the loss is reported beside it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune.model.backbone import set_train_mode

__all__ = ["LRFinding", "find_lr", "plot_lr_finding"]

SMOOTHING = 0.98  # exponential smoothing of the recorded loss (with bias correction)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its minimum


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


def find_lr(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    progress: bool = True,
) -> LRFinding:
    """Run the range test. ``optimizer``'s groups keep the ratio of their LRs to the last
    (head) group's; the head's goes from ``start_lr`` to ``end_lr`` over ``steps`` steps
    (cycling through ``loader`` as often as needed). The model's weights are changed: pass a
    model you will not train further (``finetune.lr_find`` builds a fresh one).
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr:g} and {end_lr:g}")
    head_lr = optimizer.param_groups[-1]["lr"]
    ratios = [g["lr"] / head_lr for g in optimizer.param_groups]
    set_train_mode(model)
    lrs: list[float] = []
    losses: list[float] = []
    average, best, diverged = 0.0, math.inf, False
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    bar = tqdm(total=steps, desc="lr-find", unit="step", leave=False,
               disable=None if progress else True)  # fmt: skip
    try:
        for step in range(steps):
            lr = start_lr * (end_lr / start_lr) ** (step / max(1, steps - 1))
            for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
                group["lr"] = lr * ratio
            batch = next(batches)
            while batch is None:  # a batch whose images all failed to decode
                batch = next(batches)
            images, labels = (t.to(device) for t in batch)
            loss = loss_fn(model(images), labels)
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            average = SMOOTHING * average + (1 - SMOOTHING) * loss.item()
            smoothed = average / (1 - SMOOTHING ** (step + 1))
            lrs.append(lr)
            losses.append(smoothed)
            bar.update()
            best = min(best, smoothed)
            if step > 5 and smoothed > DIVERGED * best:
                diverged = True
                break
    finally:
        bar.close()
    if len(lrs) < 3:
        raise ValueError("the loss diverged within 3 steps; lower start_lr")
    return LRFinding(
        lrs=tuple(lrs),
        losses=tuple(losses),
        minimum=lrs[int(np.argmin(losses))],
        steepest=_steepest(lrs, losses),
        diverged=diverged,
    )


def _steepest(lrs: list[float], losses: list[float]) -> float:
    """The LR where the smoothed loss falls fastest against log LR, before its minimum (the
    first tenth of the steps, where the smoothing has seen few losses, is left out)."""
    start, end = max(2, len(lrs) // 10), int(np.argmin(losses)) + 1
    if end - start < 3:
        return lrs[min(start, end - 1)]
    slope = np.gradient(np.asarray(losses[start:end]), np.log(np.asarray(lrs[start:end])))
    return lrs[start + int(np.argmin(slope))]


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
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
