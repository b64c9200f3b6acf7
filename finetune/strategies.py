"""Strategy: how much of the pretrained backbone trains, and at which learning rates.

A strategy freezes parameters and returns optimizer parameter groups (head last, with the full
learning rate). Strategies live in a registry; ``get_strategy`` names the valid ones when asked
for an unknown one. The CS231n 2x2 matrix and ``auto`` come in their own issue: ``auto`` is
registered but says plainly that it is not available yet.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import nn

from finetune.config import FitConfig
from finetune.errors import ConfigError, NotAvailableError
from finetune.models import Classifier, ParamGroup, param_groups

__all__ = [
    "STRATEGIES",
    "FinetuneAll",
    "Linear",
    "Strategy",
    "freeze",
    "get_strategy",
    "register",
    "set_train_mode",
]


class Strategy(ABC):
    """Decides which parameters train and their learning rates."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `finetune strategies`

    @abstractmethod
    def param_groups(self, model: Classifier, config: FitConfig, lr: float) -> list[dict[str, Any]]:
        """Freeze what must not train; return optimizer groups ``{"name", "params", "lr"}``."""


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


def freeze(module: nn.Module) -> None:
    """Stop ``module``'s parameters from training (BatchNorm statistics: see set_train_mode)."""
    for p in module.parameters():
        p.requires_grad_(False)


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, except normalisation layers whose parameters are all frozen stay in
    eval mode, so their running statistics do not move."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def _group(group: ParamGroup, lr: float) -> dict[str, Any]:
    return {"name": group.name, "params": group.params, "lr": lr}


@register
class Linear(Strategy):
    """Frozen backbone, train only the new head (little data, similar to ImageNet)."""

    name = "linear"
    summary = "frozen backbone; only the new head trains (little data, similar images)"

    def param_groups(self, model: Classifier, config: FitConfig, lr: float) -> list[dict[str, Any]]:
        freeze(model.backbone)
        return [_group(param_groups(model)[-1], lr)]


@register
class FinetuneAll(Strategy):
    """Everything trains; the backbone at ``lr * backbone_lr_scale``, the head at ``lr``."""

    name = "finetune-all"
    summary = "every layer trains, the backbone at a lower LR than the head (a lot of data)"

    def param_groups(self, model: Classifier, config: FitConfig, lr: float) -> list[dict[str, Any]]:
        *body, head = param_groups(model)
        return [_group(g, lr * config.backbone_lr_scale) for g in body] + [_group(head, lr)]


@register
class Auto(Strategy):
    """Placeholder for the measured choice of strategy (its own issue)."""

    name = "auto"
    summary = "not available yet: will measure data size and similarity and choose"

    def __init__(self) -> None:
        raise NotAvailableError(
            "--strategy auto is not available yet in this version. Choose one yourself: "
            "'linear' for little data similar to photos, 'finetune-all' for a lot of data."
        )

    def param_groups(self, model: Classifier, config: FitConfig, lr: float) -> list[dict[str, Any]]:
        raise NotAvailableError("--strategy auto is not available yet.")
