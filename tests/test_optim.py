"""Optimizers and LR schedules: every option builds what it says, and the LR follows the
schedule step by step (against torch's own schedulers where one exists)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import DEFAULT_LR, OPTIMIZERS, SCHEDULES, FitConfig
from finetune.data.images import load_image
from finetune.data.transforms import Preprocessing, eval_transform
from finetune.errors import ConfigError
from finetune.model.backbone import create_backbone, create_classifier, freeze
from finetune.strategies import get_strategy
from finetune.training.optim import create_optimizer, create_scheduler, cycle_ends, lr_factor

EXPECTED = {
    "sgd": (torch.optim.SGD, {"momentum": 0.0, "nesterov": False}),
    "momentum": (torch.optim.SGD, {"momentum": 0.9, "nesterov": False}),
    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "adagrad": (torch.optim.Adagrad, {}),
    "rmsprop": (torch.optim.RMSprop, {"alpha": 0.99}),
    "adam": (torch.optim.Adam, {"betas": (0.9, 0.999)}),
    "adamw": (torch.optim.AdamW, {"betas": (0.9, 0.999)}),
}


@pytest.fixture(scope="module")
def batch(fashion) -> tuple[torch.Tensor, torch.Tensor]:
    """16 real sample images at 32 px, two per class of the first eight classes."""
    classes = sorted(p.name for p in (fashion / "train").iterdir())[:8]
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=False)
    transform = eval_transform(Preprocessing.from_model(backbone, 32))
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((fashion / "train" / name).glob("*.png"))[:2]:
            images.append(transform(image=load_image(path))["image"])
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_is_built_as_named_and_lowers_the_loss(name: str, batch) -> None:
    assert set(OPTIMIZERS) == set(EXPECTED)
    torch.manual_seed(0)
    model = create_classifier(create_backbone("tf_efficientnet_lite0"), 8)
    config = FitConfig(strategy="finetune-top", optimizer=name, lr=DEFAULT_LR[name], unfreeze=1)
    groups = get_strategy("finetune-top").param_groups(model, config, config.lr)
    optimizer = create_optimizer(groups, config)
    kind, settings = EXPECTED[name]
    assert type(optimizer) is kind
    for group in optimizer.param_groups:
        for key, value in settings.items():
            assert group[key] == value, (name, key)
        # Weight decay on weights only: never on biases and norm layers (ndim <= 1).
        dims = {p.ndim for p in group["params"]}
        assert (dims <= {0, 1}) == (group["weight_decay"] == 0.0)
    head = [g for g in optimizer.param_groups if g["name"] == "head"]
    assert {g["lr"] for g in head} == {DEFAULT_LR[name]}
    assert all(g["lr"] < DEFAULT_LR[name] for g in optimizer.param_groups if g["name"] != "head")
    # The head's loss on a fixed batch of real features (backbone frozen): convex, must fall.
    freeze(model.backbone)
    images, labels = batch
    with torch.no_grad():
        features = model.eval().forward_features(images)
        before = F.cross_entropy(model.head(features), labels).item()
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(model.head(features), labels).backward()
        optimizer.step()
    with torch.no_grad():
        after = F.cross_entropy(model.head(features), labels).item()
    assert after < before, (name, before, after)


def test_nesterov_without_momentum_is_refused() -> None:
    with pytest.raises(ConfigError, match="--momentum above 0"):
        create_optimizer([{"params": [nn.Parameter(torch.ones(2, 2))], "lr": 0.1}],
                         FitConfig(optimizer="nesterov", momentum=0.0))  # fmt: skip


def _lrs(config: FitConfig, steps_per_epoch: int, base=(0.1, 1.0)) -> list[list[float]]:
    """The LR of each group at every optimizer step of a run with ``config``."""
    params = [nn.Parameter(torch.zeros(1)) for _ in base]
    optimizer = torch.optim.SGD(
        [{"params": [p], "lr": lr} for p, lr in zip(params, base, strict=True)]
    )
    scheduler = create_scheduler(optimizer, config, steps_per_epoch)
    seen = []
    for _ in range(config.epochs * steps_per_epoch):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


def _torch_lrs(make, epochs: int, steps_per_epoch: int) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make(optimizer)
    seen = []
    for _ in range(epochs * steps_per_epoch):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_group_follows_the_schedule_step_by_step(schedule: str) -> None:
    epochs, per_epoch = 6, 5
    config = FitConfig(schedule=schedule, epochs=epochs, lr=1.0)
    lrs = _lrs(config, per_epoch)
    head = [row[1] for row in lrs]
    assert [row[0] for row in lrs] == pytest.approx([0.1 * lr for lr in head])  # ratio kept
    assert head == pytest.approx([lr_factor(s, config, per_epoch) for s in range(len(head))])
    steps = epochs * per_epoch
    if schedule == "constant":
        assert head == pytest.approx([1.0] * steps)
    elif schedule == "step":  # a third of 6 epochs: x0.1 after epochs 2 and 4, like StepLR
        expected = _torch_lrs(
            lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2 * per_epoch, gamma=0.1),
            epochs, per_epoch)  # fmt: skip
        assert head == pytest.approx(expected)
        assert head[2 * per_epoch] == pytest.approx(0.1) and head[-1] == pytest.approx(0.01)
    elif schedule == "exponential":  # ends at 1% of the start: gamma = 0.01 ** (1 / 6) per epoch
        gamma = 0.01 ** (1 / (epochs * per_epoch))
        expected = _torch_lrs(
            lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=gamma), epochs, per_epoch
        )
        assert head == pytest.approx(expected)  # fmt: skip
    elif schedule == "cosine":
        expected = _torch_lrs(
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps), epochs, per_epoch
        )
        assert head == pytest.approx(expected, abs=1e-9)  # fmt: skip
    elif schedule == "restarts":  # 3 cycles of 2 epochs, each a cosine from the top
        assert cycle_ends(config) == [2, 4, 6]
        one = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(
            o, T_max=2 * per_epoch), 2, per_epoch)  # fmt: skip
        assert head == pytest.approx(one * 3, abs=1e-9)
    elif schedule == "onecycle":  # up from 1/25 for 30% of the steps, then down to ~0
        peak = max(range(steps), key=head.__getitem__)
        assert head[0] == pytest.approx(1 / 25)
        assert peak in (math.floor(0.3 * steps), math.ceil(0.3 * steps))
        rising, falling = head[: peak + 1], head[peak:]
        assert all(a <= b for a, b in itertools.pairwise(rising))
        assert all(a >= b for a, b in itertools.pairwise(falling))
        assert head[-1] < 0.01


def test_warm_up_rises_linearly_then_the_schedule_runs_on_the_remaining_epochs() -> None:
    config = FitConfig(schedule="cosine", epochs=5, lr_warmup_epochs=1, lr=1.0)
    head = [row[1] for row in _lrs(config, steps_per_epoch=4)]
    assert head[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    after = FitConfig(schedule="cosine", epochs=4, lr=1.0)
    assert head[4:] == pytest.approx([row[1] for row in _lrs(after, 4)], abs=1e-9)


def test_step_and_exponential_take_their_factors() -> None:
    config = FitConfig(schedule="step", epochs=6, lr_step_epochs=1, lr_gamma=0.5, lr=1.0)
    head = [row[1] for row in _lrs(config, steps_per_epoch=2)]
    assert head[::2] == pytest.approx([1, 0.5, 0.25, 0.125, 0.0625, 0.03125])
    config = FitConfig(schedule="exponential", epochs=3, lr_gamma=0.5, lr=1.0)
    head = [row[1] for row in _lrs(config, steps_per_epoch=1)]
    assert head == pytest.approx([1, 0.5, 0.25])


CYCLES = [(6, None, [2, 4, 6]), (10, 2, [5, 10]), (3, 3, [1, 2, 3]), (7, 1, [7])]


@pytest.mark.parametrize(("epochs", "cycles", "ends"), CYCLES)
def test_cycle_ends_give_one_snapshot_per_cycle(epochs, cycles, ends) -> None:
    config = FitConfig(schedule="restarts", epochs=epochs, cycles=cycles)
    assert cycle_ends(config) == ends
    assert cycle_ends(FitConfig(schedule="cosine", epochs=epochs)) == [epochs]


def test_invalid_schedule_options_name_the_field() -> None:
    for options, field in (
        ({"schedule": "linear"}, "schedule"),
        ({"epochs": 3, "cycles": 4, "schedule": "restarts"}, "cycles"),
        ({"lr_warmup_epochs": 10, "epochs": 10}, "lr_warmup_epochs"),
        ({"lr_gamma": 1.5}, "lr_gamma"),
        ({"momentum": 1.0}, "momentum"),
        ({"dropout": 1.0}, "dropout"),
        ({"patience": 0}, "patience"),
        ({"ema_decay": 1.0}, "ema_decay"),
    ):
        with pytest.raises(ConfigError, match=field):
            FitConfig(**options)
