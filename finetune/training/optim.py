"""Optimizer and learning-rate schedule of the fine-tuning strategies.

:func:`create_optimizer` builds any of the lecture's optimizers over the strategy's parameter
groups (head last, each with its own LR), splitting every group so that weight decay never
touches norm layers and biases. :func:`create_scheduler` makes every group's LR follow one
factor per step, :func:`lr_factor`: an optional linear warm-up, then constant, step decay,
exponential decay, cosine, cosine with restarts (a snapshot after each cycle, see
:func:`cycle_ends`) or one-cycle. The factor is a pure function of the step, so the schedule
can be plotted, tested against its formula, and resumed from the step count alone.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import nn

from finetune.config import DEFAULT_CYCLES, DEFAULT_EPOCHS, EXPONENTIAL_END, STEP_GAMMA, FitConfig
from finetune.errors import ConfigError

__all__ = [
    "create_optimizer",
    "create_scheduler",
    "cycle_ends",
    "load_optimizer_state",
    "lr_factor",
    "shorten_schedule",
]

ONECYCLE_WARM = 0.3  # share of the steps one-cycle spends rising to the peak LR
ONECYCLE_START = 1 / 25  # its first LR, as a fraction of the peak (Smith; torch OneCycleLR)
ONECYCLE_END = ONECYCLE_START / 1e4  # and its last


def create_optimizer(groups: list[dict[str, Any]], config: FitConfig) -> torch.optim.Optimizer:
    """``config.optimizer`` over ``groups`` (dicts with "params" and "lr", head last).

    Each group is split into the parameters weight decay applies to (``config.weight_decay``)
    and those it skips: the group's "no_decay" list when it has one (the model's rule, see
    ``finetune.model.backbone.param_groups``: norms, biases, position embeddings, class tokens),
    otherwise its norm and bias parameters (ndim <= 1). Both halves keep the group's name and
    LR and the parameters' order, decayed half first, the layout checkpoints hold.
    """
    split: list[dict[str, Any]] = []
    for group in groups:
        options = {k: v for k, v in group.items() if k != "no_decay"}
        if "no_decay" in group:
            skipped = {id(p) for p in group["no_decay"]}
            exempt = [id(p) in skipped for p in group["params"]]
        else:
            exempt = [p.ndim <= 1 for p in group["params"]]
        decay = [p for p, e in zip(group["params"], exempt, strict=True) if not e]
        no_decay = [p for p, e in zip(group["params"], exempt, strict=True) if e]
        for params, wd in ((decay, config.weight_decay), (no_decay, 0.0)):
            if params:
                split.append({**options, "params": params, "weight_decay": wd})
    lr = config.lr if config.lr is not None else groups[-1]["lr"]
    name = config.optimizer
    if name == "sgd":
        return torch.optim.SGD(split, lr=lr, momentum=0.0)
    if name in ("momentum", "nesterov"):
        if config.momentum == 0:
            raise ConfigError(f"--optimizer {name} needs --momentum above 0 (e.g. 0.9).")
        return torch.optim.SGD(split, lr=lr, momentum=config.momentum, nesterov=name == "nesterov")
    if name == "adagrad":
        return torch.optim.Adagrad(split, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(split, lr=lr, alpha=0.99)
    if name == "adam":
        return torch.optim.Adam(split, lr=lr, betas=(0.9, 0.999))
    if name == "adamw":
        return torch.optim.AdamW(split, lr=lr, betas=(0.9, 0.999))
    raise ConfigError(f"Unknown optimizer {name!r}.")  # FitConfig already refuses it


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    model: nn.Module,
) -> None:
    """Load a checkpoint's optimizer and scheduler state (``last.pt`` of a resumed run).

    Earlier versions split every group by ndim alone, so for a model that names more
    exemptions (a ViT's ``pos_embed`` and ``cls_token``) the halves in their checkpoints hold
    other parameters than :func:`create_optimizer`'s. Such a state is laid out again, each
    parameter keeping its own moments and each group its LR; any other mismatch is torch's
    error, as before.
    """
    if _layout(optimizer_state["param_groups"]) != _layout(optimizer.param_groups):
        relaid = _from_ndim_split(optimizer, optimizer_state, scheduler_state, model)
        if relaid is not None:
            optimizer_state, scheduler_state = relaid
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)


def _layout(groups: list[dict[str, Any]]) -> list[tuple[Any, int]]:
    return [(g.get("name"), len(g["params"])) for g in groups]


def _from_ndim_split(
    optimizer: torch.optim.Optimizer,
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    model: nn.Module,
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The states in ``optimizer``'s layout when they were saved with the ndim-only split of
    the same groups (weights, then norms and biases, each in model order); else None."""
    order = {id(p): i for i, p in enumerate(model.parameters())}
    names = list(dict.fromkeys(g.get("name") for g in optimizer.param_groups))
    old: list[tuple[Any, list[nn.Parameter]]] = []
    for name in names:
        params = [p for g in optimizer.param_groups if g.get("name") == name for p in g["params"]]
        params.sort(key=lambda p: order.get(id(p), len(order)))
        for half in ([p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]):
            if half:
                old.append((name, half))
    saved = optimizer_state["param_groups"]
    if [(name, len(half)) for name, half in old] != _layout(saved):
        return None
    moments = {}  # id(param) -> its saved state
    for (_, half), group in zip(old, saved, strict=True):
        for index, p in zip(group["params"], half, strict=True):
            if index in optimizer_state["state"]:
                moments[id(p)] = optimizer_state["state"][index]
    first = {}  # group name -> index of its first saved group
    for i, group in enumerate(saved):
        first.setdefault(group["name"], i)
    groups, state, index = [], {}, 0
    for group in optimizer.param_groups:
        ids = list(range(index, index + len(group["params"])))
        source = saved[first[group.get("name")]]
        groups.append({**source, "weight_decay": group["weight_decay"], "params": ids})
        for i, p in zip(ids, group["params"], strict=True):
            if id(p) in moments:
                state[i] = moments[id(p)]
        index += len(ids)
    scheduler_state = dict(scheduler_state)
    for key in ("base_lrs", "_last_lr"):  # one entry per group
        if key in scheduler_state:
            per_group = scheduler_state[key]
            scheduler_state[key] = [per_group[first[g.get("name")]] for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}, scheduler_state


def cycle_ends(config: FitConfig) -> list[int]:
    """The epochs (1-based) after which each LR cycle of ``restarts`` ends; a snapshot is saved
    after each. Other schedules have one cycle, ending with the last epoch."""
    epochs = config.epochs or DEFAULT_EPOCHS
    if config.schedule != "restarts":
        return [epochs]
    warm = config.lr_warmup_epochs
    cycles = config.cycles or min(DEFAULT_CYCLES, max(1, int(epochs - warm)))
    ends = [round(warm + k * (epochs - warm) / cycles) for k in range(1, cycles + 1)]
    return sorted(set(max(1, e) for e in ends))


def lr_factor(step: int, config: FitConfig, steps_per_epoch: int) -> float:
    """The LR at optimizer step ``step`` (0-based), as a fraction of each group's base LR."""
    epochs = config.epochs or DEFAULT_EPOCHS
    t = step / steps_per_epoch  # epochs done
    if config.schedule == "onecycle":
        u = min(t / epochs, 1.0)
        if u < ONECYCLE_WARM:
            return _cos_between(ONECYCLE_START, 1.0, u / ONECYCLE_WARM)
        return _cos_between(1.0, ONECYCLE_END, (u - ONECYCLE_WARM) / (1 - ONECYCLE_WARM))
    warm = config.lr_warmup_epochs
    if t < warm:
        return (step + 1) / (warm * steps_per_epoch)
    t, span = t - warm, epochs - warm
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "step":
        every = config.lr_step_epochs or max(1, math.ceil(span / 3))
        return (config.lr_gamma or STEP_GAMMA) ** math.floor(t / every + 1e-9)
    if config.schedule == "exponential":
        gamma = config.lr_gamma or EXPONENTIAL_END ** (1 / span)
        return gamma**t
    if config.schedule == "cosine":
        return _cos_between(1.0, 0.0, t / span)
    if config.schedule == "restarts":
        start = warm
        for end in cycle_ends(config):
            if t + warm < end:
                return _cos_between(1.0, 0.0, (t + warm - start) / (end - start))
            start = end
        return 0.0
    raise ConfigError(f"Unknown schedule {config.schedule!r}.")  # FitConfig already refuses it


def shorten_schedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    config: FitConfig,
    steps_per_epoch: int,
    epochs: int,
) -> None:
    """Make a scheduler from :func:`create_scheduler` end its schedule with epoch ``epochs``
    instead of ``config.epochs`` (the time budget cut the run): from the next step on, the LR
    follows the schedule as planned for ``epochs`` epochs, so a cosine still anneals to zero
    by the run's real end. ``lr_lambdas`` is LambdaLR's own list of factors; a
    :func:`functools.partial` keeps nothing in its state dict, so checkpoints stay plain."""
    factor = partial(
        lr_factor, config=replace(config, epochs=epochs), steps_per_epoch=max(1, steps_per_epoch)
    )
    scheduler.lr_lambdas = [factor] * len(scheduler.lr_lambdas)


def _cos_between(start: float, end: float, fraction: float) -> float:
    """Half a cosine from ``start`` (fraction 0) to ``end`` (fraction 1)."""
    fraction = min(max(fraction, 0.0), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * fraction)) / 2


def create_scheduler(
    optimizer: torch.optim.Optimizer, config: FitConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler: every group's LR is its base LR times :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, config=config, steps_per_epoch=max(1, steps_per_epoch))
    )
