"""``auto``: measure the data's size and similarity to ImageNet
(:mod:`finetune.strategies.measure`), pick one of the four strategies, and record why.

When it picks a fine-tune, auto is never worse than its own probe: the probe of the same row
of the matrix (``linear`` beside ``finetune-top``, ``stage-probe`` beside ``finetune-all``) is
fit first, cheaply (one pass over the images), into the run's ``baseline/`` folder
(:func:`fit_baseline`); when the fine-tune ends, the better of the two on the same validation
images goes to ``best.pt`` (:func:`compare`). A fine-tune cut short by a CPU budget, or one
that distorts good pretrained features, lost to the probe in the measurements that led here
(issue 20: 0.809 against 0.832 for 15x the time).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from finetune.config import FitConfig
from finetune.data.scan import DatasetSplit
from finetune.data.transforms import Preprocessing
from finetune.errors import ConfigError
from finetune.strategies.base import FitContext, Strategy, get_strategy, register
from finetune.strategies.measure import CPU_BUDGET_SECONDS, Decision, decide
from finetune.training.loop import EpochResult

__all__ = ["Auto", "Comparison", "compare", "fit_baseline"]


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


@dataclass(frozen=True)
class Comparison:
    """Which of auto's probe baseline and its fine-tune a run keeps in ``best.pt``."""

    kept: str  # "probe" or "finetune"
    probe: str  # the probe's strategy name
    probe_val_acc: float
    probe_val_loss: float
    finetune: str  # the fine-tune's strategy name
    finetune_val_acc: float  # its best epoch's
    finetune_val_loss: float
    finetune_epoch: int

    @property
    def margin(self) -> float:
        """Val accuracy of the kept model minus the other's (>= 0)."""
        return abs(self.finetune_val_acc - self.probe_val_acc)

    def describe(self) -> str:
        """One line for people: what was kept, over what, by how much."""
        ft = f"{self.finetune}'s best epoch ({self.finetune_epoch})"
        scores = (
            f"val acc {self.probe_val_acc:.3f} for the probe, {self.finetune_val_acc:.3f} for {ft}"
        )
        if self.kept == "probe":
            by = (
                f"{self.margin * 100:.1f} points better"
                if self.margin > 0
                else "as accurate at a val loss no higher"
            )
            return (
                f"the {self.probe} probe, {scores}: the probe is {by}, so best.pt is the probe "
                "(the fine-tune's best epoch is in finetune-best.pt)"
            )
        return f"the fine-tune, {scores}: +{self.margin * 100:.1f} points over the probe"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compare(
    baseline: EpochResult, history: list[EpochResult], probe: str, finetune: str
) -> Comparison:
    """The better of the probe (``baseline``) and the fine-tune's best epoch in ``history``:
    val accuracy first, then val loss, as epochs are ranked; a tie goes to the probe, the
    simpler model."""
    best = [r for r in history if r.best][-1]
    probe_wins = (baseline.val_acc, -baseline.val_loss) >= (best.val_acc, -best.val_loss)
    return Comparison(
        kept="probe" if probe_wins else "finetune",
        probe=probe,
        probe_val_acc=baseline.val_acc,
        probe_val_loss=baseline.val_loss,
        finetune=finetune,
        finetune_val_acc=best.val_acc,
        finetune_val_loss=best.val_loss,
        finetune_epoch=best.epoch,
    )


def fit_baseline(ctx: FitContext, decision: Decision) -> tuple[str, EpochResult]:
    """Fit ``decision.baseline``, the probe of the fine-tune's row, on a copy of the still
    pretrained ``ctx.model`` at ``decision.baseline_image_size``, into the run's ``baseline/``
    folder (a run folder of its own: ``best.pt``, ``probe.json``, ``metrics.csv``). A
    ``stage-probe`` on a model without intermediate stages falls back to ``linear``.

    Returns:
        The probe's name and its one result (val accuracy on the run's validation images).
    """
    name = decision.baseline or "linear"
    folder = ctx.run.baseline
    folder.path.mkdir(exist_ok=True)
    size = decision.baseline_image_size or ctx.config.image_size
    pre = Preprocessing.from_model(ctx.model.backbone, size)
    config = replace(ctx.config, strategy=name, image_size=size, epochs=1, out=str(folder.path))
    results: list[EpochResult] = []

    def run(probe: str) -> None:
        probe_config = replace(config, strategy=probe)
        probe_ctx = dataclasses.replace(
            ctx,
            model=copy.deepcopy(ctx.model),
            pre=pre,
            config=probe_config,
            run_dir=folder.path,
            meta=replace(
                ctx.meta, preprocessing=pre, config=probe_config.to_dict(), strategy=probe,
                augmentation=None,
            ),
            on_epoch=results.append,
            resumed=None,
        )  # fmt: skip
        get_strategy(probe).fit(probe_ctx)

    try:
        run(name)
    except ConfigError:  # stage-probe on a model without intermediate stages: the top features
        if name == "linear":
            raise
        name = "linear"
        run(name)
    return name, results[-1]
