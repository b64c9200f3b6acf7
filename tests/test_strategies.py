"""The strategy registry, freezing, frozen BatchNorm and learning-rate groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import FitConfig
from finetune.errors import ConfigError, NotAvailableError
from finetune.models import create_backbone, create_classifier
from finetune.strategies import STRATEGIES, get_strategy, set_train_mode


def _model() -> nn.Module:
    return create_classifier(create_backbone("tf_efficientnet_lite0"), 3)


def _bn_stats(model: nn.Module) -> list[torch.Tensor]:
    return [
        m.running_mean.clone() for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)
    ]


def _one_step(model: nn.Module, groups: list[dict]) -> None:
    optimizer = torch.optim.SGD(groups, lr=0.1)
    set_train_mode(model)
    loss = F.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()


def test_linear_trains_only_the_head_and_frozen_batchnorm_does_not_move() -> None:
    model = _model()
    groups = get_strategy("linear").param_groups(model, FitConfig(), lr=0.1)
    assert [g["name"] for g in groups] == ["head"]
    assert not any(p.requires_grad for p in model.backbone.parameters())
    before_bn = _bn_stats(model)
    before_head = model.head.weight.clone()
    before_stem = model.backbone.conv_stem.weight.clone()
    _one_step(model, groups)
    assert all(torch.equal(a, b) for a, b in zip(before_bn, _bn_stats(model), strict=True))
    assert torch.equal(before_stem, model.backbone.conv_stem.weight)
    assert not torch.equal(before_head, model.head.weight)
    assert not model.backbone.bn1.training and model.training


def test_finetune_all_trains_everything_with_a_lower_backbone_lr() -> None:
    model = _model()
    config = FitConfig(strategy="finetune-all", backbone_lr_scale=0.1)
    groups = get_strategy("finetune-all").param_groups(model, config, lr=1e-3)
    assert groups[-1]["name"] == "head" and groups[-1]["lr"] == 1e-3
    assert all(g["lr"] == pytest.approx(1e-4) for g in groups[:-1])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    before_bn = _bn_stats(model)
    before_stem = model.backbone.conv_stem.weight.clone()
    _one_step(model, groups)
    assert not torch.equal(before_stem, model.backbone.conv_stem.weight)
    assert not all(torch.equal(a, b) for a, b in zip(before_bn, _bn_stats(model), strict=True))


def test_unknown_strategy_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        get_strategy("linaer")
    for name in STRATEGIES:
        assert name in str(info.value)


def test_auto_says_it_is_not_available_yet() -> None:
    with pytest.raises(NotAvailableError, match="not available yet"):
        get_strategy("auto")
