"""``auto``: measure the data's size and similarity to ImageNet
(:mod:`finetune.strategies.measure`), pick one of the four strategies, and record why.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from finetune.config import FitConfig
from finetune.data.scan import DatasetSplit
from finetune.errors import ConfigError
from finetune.strategies.base import FitContext, Strategy, get_strategy, register
from finetune.strategies.measure import CPU_BUDGET_SECONDS, Decision, decide
from finetune.training.loop import EpochResult

__all__ = ["Auto"]


@register
class Auto(Strategy):
    """Measure data size and similarity, then run the matching cell of the matrix."""

    name = "auto"
    summary = "measures data size and similarity to ImageNet, picks one of the four, says why"

    def resolve(
        self, split: DatasetSplit, backbone: nn.Module, config: FitConfig, device: torch.device
    ) -> tuple[Strategy, FitConfig, Decision | None]:
        decision = decide(
            split,
            backbone,
            device=device,
            image_size=config.image_size,
            epochs=config.epochs,
            batch_size=config.batch_size,
            seed=config.seed,
            cpu_budget_seconds=(
                CPU_BUDGET_SECONDS if config.time_budget is None else 60 * config.time_budget
            ),
            channels_last=bool(config.channels_last),
        )
        chosen = get_strategy(decision.strategy)
        settings = {k: v for k, v in decision.settings.items() if getattr(config, k) in (None, 0)}
        return chosen, replace(config, **settings), decision

    def fit(self, ctx: FitContext) -> list[EpochResult]:
        raise ConfigError("auto runs the strategy it resolves to; call resolve() first.")
