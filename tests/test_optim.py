"""Optimizers and LR schedules: every option builds what it says, and the LR follows the
schedule step by step (against torch's own schedulers where one exists)."""

from __future__ import annotations

import itertools
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn

from finetune.config import DEFAULT_LR, OPTIMIZERS, SCHEDULES, FitConfig
from finetune.data.images import load_image
from finetune.data.transforms import Preprocessing, eval_transform
from finetune.errors import ConfigError
from finetune.model.backbone import create_backbone, create_classifier, freeze
from finetune.strategies import get_strategy
from finetune.training.optim import (
    create_optimizer,
    create_scheduler,
    cycle_ends,
    load_optimizer_state,
    lr_factor,
    shorten_schedule,
)

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


NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _vit() -> nn.Module:
    """A ViT-Tiny on 32 px images (4 patches + class token), random weights."""
    backbone = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0
    )
    return create_classifier(backbone, 3)


def _decay_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


def _layout(optimizer: torch.optim.Optimizer) -> list[tuple]:
    """Each optimizer group's name, LR, weight decay and parameters (by identity), in order."""
    return [(g["name"], g["lr"], g["weight_decay"], [id(p) for p in g["params"]])
            for g in optimizer.param_groups]  # fmt: skip


def _ndim_split(groups: list[dict]) -> list[dict]:
    """The groups without their "no_decay" lists: create_optimizer then splits them by ndim
    alone, as every version before the model's no_weight_decay() was honoured did."""
    return [{k: v for k, v in g.items() if k != "no_decay"} for g in groups]


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18", "convnext_atto"])
def test_cnn_weights_decay_norms_and_biases_do_not_and_the_layout_is_unchanged(name) -> None:
    model = create_classifier(create_backbone(name, pretrained=False), 3)
    config = FitConfig(strategy="finetune-all", weight_decay=0.05, layer_decay=0.5)
    groups = get_strategy("finetune-all").param_groups(model, config, lr=1e-3)
    optimizer = create_optimizer(groups, config)
    decay = _decay_of(optimizer)
    assert len(decay) == len(list(model.parameters()))
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert decay[id(module.weight)] == 0.05, module
            assert module.bias is None or decay[id(module.bias)] == 0.0, module
        if isinstance(module, NORMS):
            assert all(decay[id(p)] == 0.0 for p in module.parameters()), module
    # timm's own helper decides the same for every parameter
    timm_groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=())
    assert decay == {id(p): g["weight_decay"] for g in timm_groups for p in g["params"]}
    # Groups, LRs, decay and parameter order as before: old checkpoints' optimizer state fits.
    assert _layout(optimizer) == _layout(create_optimizer(_ndim_split(groups), config))


def test_vit_position_embedding_and_class_token_are_not_decayed() -> None:
    model = _vit()
    vit = model.backbone
    config = FitConfig(strategy="finetune-all", weight_decay=0.05, backbone_lr_scale=0.1,
                       layer_decay=0.5)  # fmt: skip
    groups = get_strategy("finetune-all").param_groups(model, config, lr=1e-3)
    optimizer = create_optimizer(groups, config)
    decay = _decay_of(optimizer)
    assert decay[id(vit.pos_embed)] == decay[id(vit.cls_token)] == 0.0
    assert (
        decay[id(vit.patch_embed.proj.weight)] == decay[id(vit.blocks[0].attn.qkv.weight)] == 0.05
    )
    assert decay[id(vit.blocks[0].norm1.weight)] == decay[id(vit.blocks[0].attn.qkv.bias)] == 0.0
    # the whole model follows timm's contract, so timm's helper agrees on every parameter
    assert {"backbone.pos_embed", "backbone.cls_token"} <= model.no_weight_decay()
    timm_groups = param_groups_weight_decay(
        model, 0.05, no_weight_decay_list=model.no_weight_decay()
    )
    assert decay == {id(p): g["weight_decay"] for g in timm_groups for p in g["params"]}
    # The LRs are the layer groups' as before: stem lowest, the head at lr, halving per group.
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    depth = len(groups) - 2  # the stem's distance below the top backbone group
    assert lrs[id(vit.pos_embed)] == pytest.approx(1e-4 * 0.5**depth)
    assert lrs[id(model.head.weight)] == 1e-3
    old = create_optimizer(_ndim_split(groups), config)
    assert lrs == {id(p): g["lr"] for g in old.param_groups for p in g["params"]}
    assert _decay_of(old)[id(vit.pos_embed)] == 0.05  # what the ndim rule got wrong


def _steps(model: nn.Module, optimizer, scheduler, steps: int) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _saved(state: dict, tmp_path) -> dict:
    torch.save(state, tmp_path / "state.pt")  # the way last.pt stores it
    return torch.load(tmp_path / "state.pt", weights_only=True)


def test_a_vit_run_saved_before_the_fix_resumes_with_each_parameters_moments(tmp_path) -> None:
    torch.manual_seed(0)
    model = _vit()
    config = FitConfig(strategy="finetune-all", optimizer="adamw", lr=1e-3, epochs=3,
                       schedule="cosine", layer_decay=0.5)  # fmt: skip
    groups = get_strategy("finetune-all").param_groups(model, config, config.lr)
    old = create_optimizer(_ndim_split(groups), config)  # how the previous version laid it out
    old_scheduler = create_scheduler(old, config, steps_per_epoch=2)
    _steps(model, old, old_scheduler, 3)
    saved = _saved({"optimizer": old.state_dict(), "scheduler": old_scheduler.state_dict()},
                   tmp_path)  # fmt: skip

    optimizer = create_optimizer(groups, config)
    scheduler = create_scheduler(optimizer, config, steps_per_epoch=2)
    assert _layout(optimizer) != _layout(old)  # pos_embed and cls_token changed halves
    with pytest.raises(ValueError, match="size"):  # why torch's loader alone cannot
        create_optimizer(groups, config).load_state_dict(saved["optimizer"])
    load_optimizer_state(optimizer, scheduler, saved["optimizer"], saved["scheduler"], model)
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(optimizer.state[p][key], old.state[p][key]), key
    lr_of = {id(p): g["lr"] for g in old.param_groups for p in g["params"]}
    assert [g["lr"] for g in optimizer.param_groups] == [
        lr_of[id(g["params"][0])] for g in optimizer.param_groups
    ]
    assert _decay_of(optimizer)[id(model.backbone.pos_embed)] == 0.0  # the fix holds
    assert scheduler.last_epoch == 3
    _steps(model, optimizer, scheduler, 1)  # and training goes on, at the schedule's LRs
    head = optimizer.param_groups[-1]
    assert head["lr"] == pytest.approx(config.lr * lr_factor(4, config, 2))

    # A state of another model is still refused, by torch, as before.
    other = create_classifier(create_backbone("resnet18", pretrained=False), 3)
    other_optimizer = create_optimizer(
        get_strategy("finetune-all").param_groups(other, config, config.lr), config
    )
    with pytest.raises(ValueError):
        load_optimizer_state(other_optimizer, create_scheduler(other_optimizer, config, 2),
                             saved["optimizer"], saved["scheduler"], other)  # fmt: skip


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


def test_a_schedule_shortened_by_the_budget_anneals_by_the_new_end(tmp_path) -> None:
    config = FitConfig(schedule="cosine", epochs=10)
    weight = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = create_scheduler(optimizer, config, steps_per_epoch=4)
    for _ in range(8):  # two epochs as planned for ten
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_factor(8, config, 4))
    shorten_schedule(scheduler, config, 4, epochs=4)
    short = FitConfig(schedule="cosine", epochs=4)
    lrs = []
    for _ in range(7):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([lr_factor(step, short, 4) for step in range(9, 16)])
    assert lrs[-1] < 0.05 < lr_factor(15, config, 4)  # near zero at the new end, not the old
    # The state dict stays plain values: last.pt loads with weights_only.
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["last_epoch"] == 15
