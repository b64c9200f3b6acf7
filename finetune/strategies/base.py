"""Strategy: how much of the pretrained backbone trains (the CS231n lecture 7 matrix).

|                   | little data   | a lot of data  |
|-------------------|---------------|----------------|
| similar images    | linear        | finetune-top   |
| different images  | stage-probe   | finetune-all   |

Every strategy is registered under its name and implements ``fit(ctx)``. The two probe
strategies run the frozen backbone once over the images (cached features) and fit a
logistic-regression head; the two fine-tuning strategies train layer groups from timm's
``group_matcher`` with learning rates that decay from the head down. ``auto`` measures the data
(:mod:`finetune.strategies.measure`), picks one of the four, and records why.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finetune.config import FitConfig
from finetune.data.scan import DatasetSplit
from finetune.data.transforms import (
    Augmentation,
    Lighting,
    Preprocessing,
)
from finetune.errors import ConfigError
from finetune.model.backbone import Classifier
from finetune.run.checkpoint import CheckpointMeta
from finetune.run.layout import RunDir
from finetune.strategies.measure import Decision
from finetune.training.distributed import ALONE, World
from finetune.training.loop import EpochResult

__all__ = ["STRATEGIES", "FitContext", "Strategy", "get_strategy", "register"]


@dataclass
class FitContext:
    """Everything a strategy needs to train; built by ``finetune.fit``."""

    model: Classifier
    split: DatasetSplit
    pre: Preprocessing
    config: FitConfig  # resolved: lr, epochs, image_size, num_workers and device are set
    device: torch.device
    run_dir: Path
    meta: CheckpointMeta  # what the checkpoints say about the model (a strategy's changes
    # to the model or its training go in a dataclasses.replace'd copy, never into this one)
    verbose: bool
    say: Callable[[str], None]  # prints a line for people (when verbose)
    on_epoch: Callable[[EpochResult], None]
    augmentation: Augmentation  # the training augmentation (fine-tuning strategies)
    lighting: Lighting | None  # PCA of the training images' colours, for PCA lighting
    resumed: dict[str, Any] | None = None  # last.pt of the run being resumed
    ranks: World = ALONE  # the training processes (torchrun): rank 0 writes
    # The time budget: training ends by this time.perf_counter() value (None: no budget)
    deadline: float | None = None

    @property
    def run(self) -> RunDir:
        """The run directory's files by name."""
        return RunDir(self.run_dir)


class Strategy(ABC):
    """Decides which parameters train, how, and trains them."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `finetune strategies`
    trains_backbone: ClassVar[bool] = True  # False: probes, which need no epochs

    def resolve(
        self, split: DatasetSplit, backbone: nn.Module, config: FitConfig, device: torch.device
    ) -> tuple[Strategy, FitConfig, Decision | None]:
        """The strategy that will really run, with its config; ``auto`` decides here."""
        return self, config, None

    @abstractmethod
    def fit(self, ctx: FitContext) -> list[EpochResult]:
        """Train ``ctx.model`` in place (a probe also cuts its backbone and replaces its head)
        and write its checkpoints to ``ctx.run_dir``; the history, one result per epoch.

        The model is not returned: ``ctx.model`` is it, and what the run hands on is in the
        checkpoints (``best.pt`` is what ``fit``'s report and ``finetune.load`` read).
        """


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to the registry under ``cls.name``."""
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str) -> Strategy:
    """The registered strategy called ``name``."""
    if name not in STRATEGIES:
        raise ConfigError(
            f"Unknown strategy {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}."
        )
    return STRATEGIES[name]()
