"""The fine-tunes: layer groups from timm's ``group_matcher`` train with learning rates that decay
from the head down; ``finetune-top`` trains the top groups, ``finetune-all`` every group.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import abstractmethod
from typing import Any, ClassVar

import torch
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from finetune.config import FitConfig
from finetune.data.transforms import DeviceNormalize
from finetune.errors import ConfigError
from finetune.model.backbone import (
    Classifier,
    ParamGroup,
    default_unfreeze,
    freeze,
    param_groups,
)
from finetune.model.frozen import (
    skip_prefix,
)
from finetune.strategies.base import FitContext, Strategy, register
from finetune.strategies.loaders import (
    _decoded_cache,
    _frozen_loaders,
    _frozen_outputs,
    _frozen_record,
    _loaders,
)
from finetune.training.compute import autocast_dtype, grad_scaler, keep_freed_memory
from finetune.training.loop import (
    EpochResult,
    Recorder,
    Training,
    balanced_class_weights,
    train,
)
from finetune.training.optim import (
    create_optimizer,
    create_scheduler,
    cycle_ends,
    load_optimizer_state,
    shorten_schedule,
)

__all__ = ["FinetuneAll", "FinetuneTop"]


# --- fine-tuning: layer groups train with decaying learning rates ----------------------------


def _lr_groups(
    groups: list[ParamGroup], trainable: int, config: FitConfig, lr: float
) -> list[dict[str, Any]]:
    """The head at ``lr``; the top ``trainable`` backbone groups at lr * backbone_lr_scale *
    layer_decay^depth; the rest frozen. Each group says which of its parameters weight decay
    skips ("no_decay", the model's rule; see create_optimizer)."""
    *body, head = groups
    trainable = min(trainable, len(body))
    for group in body[: len(body) - trainable]:
        for p in group.params:
            p.requires_grad_(False)
    out = []
    for depth, group in enumerate(reversed(body[len(body) - trainable :])):
        scale = config.backbone_lr_scale * config.layer_decay**depth
        out.append(_optimizer_group(group, lr * scale))
    return [*reversed(out), _optimizer_group(head, lr)]


def _optimizer_group(group: ParamGroup, lr: float) -> dict[str, Any]:
    return {"name": group.name, "params": group.params, "lr": lr, "no_decay": group.no_decay}


class _FineTune(Strategy):
    # The same layers stay frozen for the whole run, so their outputs can be computed once
    # (finetune.model.frozen) when the augmentation allows it.
    fixed_frozen: ClassVar[bool] = False

    @abstractmethod
    def trainable_groups(self, model: Classifier, config: FitConfig) -> int:
        """How many backbone layer groups (from the top) train."""

    def param_groups(self, model: Classifier, config: FitConfig, lr: float) -> list[dict]:
        """Freeze the lower groups; optimizer groups with their learning rates, head last."""
        return _lr_groups(param_groups(model), self.trainable_groups(model, config), config, lr)

    def before_epoch(self, model: Classifier, config: FitConfig, epoch: int) -> None:
        """Hook run before each epoch (e.g. unfreeze after a warm-up)."""

    def fit(self, ctx: FitContext) -> list[EpochResult]:
        model, config = ctx.model, ctx.config
        groups = self.param_groups(model, config, config.lr)
        trainable = sum(p.numel() for g in groups for p in g["params"] if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        backbone_groups = len(groups) - 1
        ctx.say(
            f"training  {backbone_groups} of {len(param_groups(model)) - 1} backbone layer groups "
            f"+ head, {trainable:,} of {total:,} parameters; head lr {config.lr:.1e}"
            + (f", top backbone lr {groups[-2]['lr']:.1e}" if backbone_groups else "")
        )
        ctx.say(f"optimise  {_describe_training(config)}")
        if ctx.ranks.distributed:
            ctx.say(
                f"parallel  {ctx.ranks.size} processes, {config.batch_size // ctx.ranks.size} "
                f"images each per step (batch {config.batch_size})"
            )
        ctx.say(f"compute   {_describe_compute(config)}")
        if config.channels_last:  # before the average copies the model: it runs NHWC too
            model.to(memory_format=torch.channels_last)
        cache = _decoded_cache(ctx)
        frozen = _frozen_outputs(ctx, cache, self.fixed_frozen)
        view = None  # what runs on the loaders' tensors: the model, or its part above the cache
        meta = ctx.meta  # what the checkpoints say about the model and how it trained
        if frozen is None:
            train_loader, val_loader = _loaders(ctx, cache)
        else:
            train_loader, val_loader = _frozen_loaders(ctx, frozen)
            view = functools.partial(skip_prefix, prefix=frozen.prefix)
            meta = dataclasses.replace(meta, frozen=_frozen_record(frozen))
        optimizer = create_optimizer(groups, config)
        scheduler = create_scheduler(optimizer, config, len(train_loader))
        ema = None
        if config.ema:  # warmed-up decay: early steps average over few weights (timm)
            ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True, device=ctx.device)
        scaler = grad_scaler(config.precision, ctx.device)  # fp16 only
        first_epoch = 1
        if ctx.resumed is not None:
            load_optimizer_state(
                optimizer, scheduler, ctx.resumed["optimizer"], ctx.resumed["scheduler"], model
            )
            if scaler is not None and "scaler" in ctx.resumed:  # the scale it had reached
                scaler.load_state_dict(ctx.resumed["scaler"])
            torch.set_rng_state(ctx.resumed["torch_rng"])
            if ema is not None:
                ema.module.load_state_dict(ctx.resumed["ema_state_dict"])
            first_epoch = ctx.resumed["epoch"] + 1

        net = model if view is None else view(model)  # shares the model's parameters
        wrapped = None if view is None else net
        if ctx.ranks.distributed:
            if config.warmup_epochs:
                raise ConfigError(
                    "--warmup-epochs changes which parameters train mid-run, which "
                    "DistributedDataParallel cannot follow; use --lr-warmup-epochs instead."
                )
            wrapped = DistributedDataParallel(
                net, device_ids=[ctx.device] if ctx.device.type == "cuda" else None
            )
        if config.compile:  # compiles at the first step; shares the model's parameters
            wrapped = torch.compile(wrapped if wrapped is not None else net)

        training = Training(
            optimizer=optimizer,
            scheduler=scheduler,
            train_loader=train_loader,
            val_loader=val_loader,
            epochs=config.epochs,
            device=ctx.device,
            class_weights=_class_weights(ctx) if config.balance == "weighted-loss" else None,
            label_smoothing=config.label_smoothing,
            ema=ema,
            patience=config.patience,
            snapshot_epochs=tuple(cycle_ends(config)) if config.schedule == "restarts" else (),
            before_epoch=lambda epoch: self.before_epoch(model, config, epoch),
            # the same shuffling and augmentation per epoch whether or not the run was resumed
            reseed=train_loader.batch_sampler.set_epoch,
            say=ctx.say,
            ranks=ctx.ranks,
            wrapped=wrapped,
            amp=autocast_dtype(config.precision),
            scaler=scaler,
            channels_last=bool(config.channels_last),
            normalize=DeviceNormalize.of(ctx.pre),  # the image loaders' uint8 batches
            view=view,
            deadline=ctx.deadline,
            replan=functools.partial(shorten_schedule, scheduler, config, len(train_loader)),
        )
        return train(
            model,
            training,
            Recorder(ctx.run_dir, meta, ctx.resumed, write=ctx.ranks.main),
            progress=ctx.verbose,
            on_epoch=ctx.on_epoch,
            first_epoch=first_epoch,
        )


def _class_weights(ctx: FitContext) -> torch.Tensor:
    """Each class's loss weighted by 1/frequency (scikit-learn's "balanced")."""
    labels = [s.label for s in ctx.split.train]
    return balanced_class_weights(labels, len(ctx.split.classes), ctx.device)


def _describe_compute(config: FitConfig) -> str:
    """One line: device, number format, memory layout, compilation, batch."""
    number = {"bf16": "bf16 autocast", "fp16": "fp16 autocast, gradient scaler"}
    parts = [config.device or "cpu", number.get(config.precision, "fp32")]
    if config.channels_last:
        parts.append("channels_last")
    if config.compile:
        parts.append("torch.compile (the first step compiles)")
    parts.append(f"batch {config.batch_size}")
    if torch.device(config.device or "cpu").type == "cpu" and keep_freed_memory():
        parts.append("freed memory kept for the next step (glibc)")
    return ", ".join(parts)


def _describe_training(config: FitConfig) -> str:
    """One line: optimizer, schedule, regularisation, averaging."""
    parts = [config.optimizer]
    if config.optimizer in ("momentum", "nesterov"):
        parts[0] += f" {config.momentum:g}"
    schedule = config.schedule
    if schedule == "restarts":
        ends = cycle_ends(config)
        schedule = (
            f"cosine in {len(ends)} cycles (snapshots after epochs {', '.join(map(str, ends))})"
        )
    if config.lr_warmup_epochs and config.schedule != "onecycle":
        schedule += f" after {config.lr_warmup_epochs:g} warm-up epochs"
    parts.append(f"{schedule} schedule")
    parts.append(f"weight decay {config.weight_decay:g}")
    for name in ("dropout", "drop_path", "label_smoothing"):
        if getattr(config, name):
            parts.append(f"{name.replace('_', ' ')} {getattr(config, name):g}")
    if config.ema:
        parts.append(f"EMA (decay {config.ema_decay:g})")
    if config.patience:
        parts.append(f"early stopping after {config.patience} epochs")
    return ", ".join(parts)


@register
class FinetuneTop(_FineTune):
    """A lot of similar data: the top ``unfreeze`` layer groups and the head train."""

    name = "finetune-top"
    summary = "a lot of similar data: the top third of the layers (--unfreeze K) and the head"
    fixed_frozen = True

    def trainable_groups(self, model: Classifier, config: FitConfig) -> int:
        body = len(param_groups(model)) - 1
        return config.unfreeze if config.unfreeze is not None else default_unfreeze(body)


@register
class FinetuneAll(_FineTune):
    """A lot of different data: every layer trains, LRs decaying from the head down."""

    name = "finetune-all"
    summary = "a lot of different data: every layer trains, LRs decaying from the head down"

    def trainable_groups(self, model: Classifier, config: FitConfig) -> int:
        return len(param_groups(model)) - 1

    def before_epoch(self, model: Classifier, config: FitConfig, epoch: int) -> None:
        freeze(model.backbone, frozen=epoch <= config.warmup_epochs)
