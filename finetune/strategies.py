"""Strategy: how much of the pretrained backbone trains (the CS231n lecture 7 matrix).

|                   | little data   | a lot of data  |
|-------------------|---------------|----------------|
| similar images    | linear        | finetune-top   |
| different images  | stage-probe   | finetune-all   |

Every strategy is registered under its name and implements ``fit(ctx)``. The two probe
strategies run the frozen backbone once over the images (cached features) and fit a
logistic-regression head; the two fine-tuning strategies train layer groups from timm's
``group_matcher`` with learning rates that decay from the head down. ``auto`` measures the data
(:mod:`finetune.measure`), picks one of the four, and records why.
"""

from __future__ import annotations

import functools
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    WeightedRandomSampler,
)

from finetune.compute import keep_freed_memory
from finetune.config import FROZEN_CACHE_UP_TO, FitConfig
from finetune.data import (
    DatasetSplit,
    ImageDataset,
    collate_skipping_failed,
    prepare_for_workers,
)
from finetune.decoded import DecodedCache, describe_size
from finetune.distributed import ALONE, World
from finetune.errors import ConfigError
from finetune.features import HEAD, extract_features, probe_points
from finetune.frozen import (
    FrozenOutputs,
    compute_frozen,
    find_prefix,
    frozen_loader,
    frozen_views,
    run_prefix,
    skip_prefix,
    view_agrees,
)
from finetune.measure import CPU_BUDGET_SECONDS, Decision, decide
from finetune.models import (
    Classifier,
    ParamGroup,
    default_unfreeze,
    freeze,
    param_groups,
    prune_to_stage,
)
from finetune.optim import create_optimizer, create_scheduler, cycle_ends
from finetune.probe import fit_probe
from finetune.train import EpochResult, Recorder, Training, train
from finetune.transforms import (
    Augmentation,
    Lighting,
    Preprocessing,
    eval_transform,
    train_transform,
)

__all__ = [
    "PREFETCH_BATCHES",
    "STRATEGIES",
    "Auto",
    "FinetuneAll",
    "FinetuneTop",
    "FitContext",
    "Linear",
    "StageProbe",
    "Strategy",
    "get_strategy",
    "register",
    "training_loaders",
]


@dataclass
class FitContext:
    """Everything a strategy needs to train; built by ``finetune.fit``."""

    model: Classifier
    split: DatasetSplit
    pre: Preprocessing
    config: FitConfig  # resolved: lr, epochs, image_size, num_workers and device are set
    device: torch.device
    run_dir: Path
    describe: dict[str, Any]  # checkpoint description; a strategy may add to it
    verbose: bool
    say: Callable[[str], None]  # prints a line for people (when verbose)
    on_epoch: Callable[[EpochResult], None]
    augmentation: Augmentation  # the training augmentation (fine-tuning strategies)
    lighting: Lighting | None  # PCA of the training images' colours, for PCA lighting
    resumed: dict[str, Any] | None = None  # last.pt of the run being resumed
    ranks: World = ALONE  # the training processes (torchrun): rank 0 writes


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
    def fit(self, ctx: FitContext) -> tuple[Classifier, list[EpochResult]]:
        """Train ``ctx.model``; return the final model (a probe may cut it) and the history."""


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


# --- probes: frozen backbone, features computed once, logistic-regression head --------------


class _Probe(Strategy):
    trains_backbone = False

    @abstractmethod
    def candidates(self, model: Classifier) -> list[str]:
        """Probe points to try (see finetune.features)."""

    def fit(self, ctx: FitContext) -> tuple[Classifier, list[EpochResult]]:
        start = time.perf_counter()
        model, config = ctx.model, ctx.config
        freeze(model.backbone)
        if config.channels_last:  # the feature pass runs NHWC (measured 1.5x faster on a CPU)
            model.backbone.to(memory_format=torch.channels_last)
        points = self.candidates(model)
        common = {
            "device": ctx.device,
            "num_workers": config.num_workers or 0,
            "cache": config.feature_cache,
            "progress": ctx.verbose,
            "channels_last": bool(config.channels_last),
        }
        train_f, hit_train = extract_features(
            model.backbone, ctx.split.train, ctx.pre, points, desc="features (train)", **common
        )
        val_f, hit_val = extract_features(
            model.backbone, ctx.split.val, ctx.pre, points, desc="features (val)", **common
        )
        ctx.say(
            f"features  {len(train_f['label'])} train + {len(val_f['label'])} val images, "
            f"{'from the cache' if hit_train and hit_val else 'computed once'} in "
            f"{time.perf_counter() - start:.1f} s, at {', '.join(points)}"
        )
        num_classes = len(ctx.split.classes)
        results = {
            p: fit_probe(
                train_f[p],
                train_f["label"],
                num_classes,
                seed=config.seed,
                balanced=config.balance not in (None, "none"),
            )
            for p in points
        }
        best = max(points, key=lambda p: (results[p].cv_accuracy, p == HEAD))
        if len(points) > 1:
            table = ", ".join(f"{p} {results[p].cv_accuracy:.3f}" for p in points)
            ctx.say(f"probe     cross-validated accuracy: {table} -> {best}")
        (ctx.run_dir / "probe.json").write_text(
            json.dumps(
                {
                    "chosen": best,
                    "points": {
                        p: {"cv_accuracy": r.cv_accuracy, "C": r.C, "cv_by_C": r.cv_by_C}
                        for p, r in results.items()
                    },
                },
                indent=2,
            )
            + "\n"
        )
        if best != HEAD:
            stage = int(best.removeprefix("stage"))
            prune_to_stage(model.backbone, stage)
            ctx.describe["model"] = {**ctx.describe["model"], "stage": stage}
            ctx.describe["model"]["num_features"] = model.num_features
        model.head = results[best].linear().to(ctx.device)
        ctx.describe["model"]["head"] = "linear"
        metrics = [
            _probe_metrics(results[best].logits(f[best]), f["label"]) for f in (train_f, val_f)
        ]
        result = EpochResult(
            epoch=1,
            train_loss=metrics[0][0],
            train_acc=metrics[0][1],
            val_loss=metrics[1][0],
            val_acc=metrics[1][1],
            lr=0.0,
            seconds=time.perf_counter() - start,
            best=True,
            gap=metrics[0][1] - metrics[1][1],
        )
        recorder = Recorder(ctx.run_dir, ctx.describe)
        recorder.record(result, model)
        ctx.on_epoch(result)
        return model, [result]


def _probe_metrics(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    t_logits = torch.from_numpy(logits).float()
    t_labels = torch.from_numpy(labels).long()
    loss = F.cross_entropy(t_logits, t_labels).item()
    return loss, float((logits.argmax(1) == labels).mean())


@register
class Linear(_Probe):
    """Little data, similar images: a logistic-regression head on the backbone's top features."""

    name = "linear"
    summary = "little data, similar images: features computed once, logistic regression on top"

    def candidates(self, model: Classifier) -> list[str]:
        return [HEAD]


@register
class StageProbe(_Probe):
    """Little data, different images: probe every stage, keep the best by cross-validation."""

    name = "stage-probe"
    summary = "little data, different images: a probe per stage, keeps the stages up to the best"

    def candidates(self, model: Classifier) -> list[str]:
        points = probe_points(model.backbone)
        if len(points) == 1:
            raise ConfigError(
                f"{type(model.backbone).__name__} exposes no intermediate stages "
                "(forward_intermediates); use --strategy linear."
            )
        return points


# --- fine-tuning: layer groups train with decaying learning rates ----------------------------


def _lr_groups(
    groups: list[ParamGroup], trainable: int, config: FitConfig, lr: float
) -> list[dict[str, Any]]:
    """The head at ``lr``; the top ``trainable`` backbone groups at lr * backbone_lr_scale *
    layer_decay^depth; the rest frozen."""
    *body, head = groups
    trainable = min(trainable, len(body))
    for group in body[: len(body) - trainable]:
        for p in group.params:
            p.requires_grad_(False)
    out = []
    for depth, group in enumerate(reversed(body[len(body) - trainable :])):
        scale = config.backbone_lr_scale * config.layer_decay**depth
        out.append({"name": group.name, "params": group.params, "lr": lr * scale})
    return [*reversed(out), {"name": head.name, "params": head.params, "lr": lr}]


class _FineTune(Strategy):
    # The same layers stay frozen for the whole run, so their outputs can be computed once
    # (finetune.frozen) when the augmentation allows it.
    fixed_frozen: ClassVar[bool] = False

    @abstractmethod
    def trainable_groups(self, model: Classifier, config: FitConfig) -> int:
        """How many backbone layer groups (from the top) train."""

    def param_groups(self, model: Classifier, config: FitConfig, lr: float) -> list[dict]:
        """Freeze the lower groups; optimizer groups with their learning rates, head last."""
        return _lr_groups(param_groups(model), self.trainable_groups(model, config), config, lr)

    def before_epoch(self, model: Classifier, config: FitConfig, epoch: int) -> None:
        """Hook run before each epoch (e.g. unfreeze after a warm-up)."""

    def fit(self, ctx: FitContext) -> tuple[Classifier, list[EpochResult]]:
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
        if frozen is None:
            train_loader, val_loader = _loaders(ctx, cache)
        else:
            train_loader, val_loader = _frozen_loaders(ctx, frozen)
            view = functools.partial(skip_prefix, prefix=frozen.prefix)
        optimizer = create_optimizer(groups, config)
        scheduler = create_scheduler(optimizer, config, len(train_loader))
        ema = None
        if config.ema:  # warmed-up decay: early steps average over few weights (timm)
            ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True, device=ctx.device)
        first_epoch = 1
        if ctx.resumed is not None:
            optimizer.load_state_dict(ctx.resumed["optimizer"])
            scheduler.load_state_dict(ctx.resumed["scheduler"])
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
            bf16=config.precision == "bf16",
            channels_last=bool(config.channels_last),
            view=view,
        )
        history = train(
            model,
            training,
            Recorder(ctx.run_dir, ctx.describe, ctx.resumed, write=ctx.ranks.main),
            progress=ctx.verbose,
            on_epoch=ctx.on_epoch,
            first_epoch=first_epoch,
        )
        return model, history


def _class_weights(ctx: FitContext) -> torch.Tensor:
    """Each class's loss weighted by 1/frequency (scikit-learn's "balanced")."""
    counts = np.bincount([s.label for s in ctx.split.train], minlength=len(ctx.split.classes))
    weights = len(ctx.split.train) / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32, device=ctx.device)


def _describe_compute(config: FitConfig) -> str:
    """One line: device, number format, memory layout, compilation, batch."""
    parts = [config.device or "cpu", "bf16 autocast" if config.precision == "bf16" else "fp32"]
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

    def fit(self, ctx: FitContext) -> tuple[Classifier, list[EpochResult]]:
        raise ConfigError("auto runs the strategy it resolves to; call resolve() first.")


# --- data loading for the fine-tuning strategies --------------------------------

# Batches each DataLoader worker prepares ahead: torch's default, written out because it is a
# trade: 2 x workers batches in flight keep a GPU fed whenever the workers together decode at
# least as fast as it trains; more would cost shared memory (a batch of 256 float images at
# 224 px is 154 MB) without making the workers faster.
PREFETCH_BATCHES = 2


def _decoded_cache(ctx: FitContext) -> DecodedCache | None:
    """The decoded-image cache when the config asks for it, filled by rank 0 before epoch 1
    (other ranks decode what they miss themselves, into the same files)."""
    if not ctx.config.cache_images:
        return None
    cache = DecodedCache.for_preprocessing(ctx.pre)
    if ctx.ranks.main:
        fill = cache.fill([*ctx.split.train, *ctx.split.val], progress=ctx.verbose)
        ctx.say(f"cache     {fill.describe()}")
    return cache


def _frozen_outputs(
    ctx: FitContext, cache: DecodedCache | None, fixed: bool
) -> FrozenOutputs | None:
    """The frozen layers' outputs, computed once (``cache_frozen``: None when the augmentation
    allows it, the model splits there and they take at most FROZEN_CACHE_UP_TO bytes; True:
    always, or an error saying why not); None when the frozen layers run every step."""
    config, split = ctx.config, ctx.split
    if config.cache_frozen is False:
        return None
    if not fixed:
        if config.cache_frozen:
            raise ConfigError(
                f"--cache-frozen needs --strategy finetune-top; {ctx.config.strategy} changes "
                "which layers train, so no layer's output stays the same."
            )
        return None
    views, why = frozen_views(ctx.augmentation)
    if not views:
        return _frozen_off(ctx, f"{why}; with --augment none (flips allowed) they run once")
    loaded = [item for item in ImageDataset(split.train[:8], eval_transform(ctx.pre), cache)
              if item is not None]  # fmt: skip
    if len(loaded) < 2:
        return _frozen_off(ctx, "fewer than 2 training images could be read to check the split")
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    example = torch.stack([image for image, _ in loaded]).to(ctx.device, memory_format=layout)
    bf16 = config.precision == "bf16"
    prefix = find_prefix(ctx.model, example)
    if isinstance(prefix, str):
        return _frozen_off(ctx, prefix)
    if not view_agrees(ctx.model, prefix, example, bf16=bf16):
        return _frozen_off(
            ctx,
            f"the layers above {prefix.output} do not take its output alone (a skip "
            "connection or arithmetic between modules), so they cannot start from a cache",
        )
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
        ctx.model.eval()
        one = run_prefix(ctx.model, prefix, example[:1])
    val = split.val[ctx.ranks.rank :: ctx.ranks.size]
    need = one.element_size() * one.numel() * (views * len(split.train) + len(val))
    if config.cache_frozen is None and need > FROZEN_CACHE_UP_TO:
        return _frozen_off(
            ctx,
            f"their outputs would take {describe_size(need)}, over "
            f"{describe_size(FROZEN_CACHE_UP_TO)}; --cache-frozen keeps them anyway",
        )
    outputs = compute_frozen(
        ctx.model, prefix, split.train, val, ctx.pre, views, device=ctx.device, bf16=bf16,
        channels_last=bool(config.channels_last), batch_size=config.batch_size,
        num_workers=config.num_workers or 0, cache=cache, progress=ctx.verbose,
    )  # fmt: skip
    versions = " (as they are and mirrored)" if views == 2 else ""
    share = " (this process's share)" if ctx.ranks.distributed else ""
    ctx.say(
        f"frozen    {prefix.describe()} run once, not every step: {len(outputs.train_labels)} "
        f"train images{versions} + {len(outputs.val_labels)} val{share} in "
        f"{outputs.seconds:.1f} s, {describe_size(outputs.nbytes)} in memory; training starts "
        f"at {prefix.first_trained}"
    )
    ctx.describe["frozen"] = {"skipped": list(prefix.skipped), "views": views}
    return outputs


def _frozen_off(ctx: FitContext, reason: str) -> None:
    """Say why the frozen layers run every step (or refuse, when --cache-frozen asked)."""
    if ctx.config.cache_frozen:
        raise ConfigError(f"--cache-frozen: cannot compute the frozen layers once: {reason}.")
    ctx.say(f"frozen    the frozen layers run every step: {reason}")


def _frozen_loaders(ctx: FitContext, frozen: FrozenOutputs) -> tuple[DataLoader, DataLoader]:
    """Loaders of the frozen layers' outputs: the training batches as the image loaders
    draw them (order, oversampling, this rank's share), validation in order."""
    pin = ctx.device.type == "cuda"
    batches = seeded_batches(frozen.train_labels.tolist(), ctx.config, ctx.ranks)
    train_loader = frozen_loader(
        frozen.train, frozen.train_labels, batch_sampler=batches, pin_memory=pin
    )
    val_loader = frozen_loader(
        frozen.val, frozen.val_labels, batch_size=batches.batches.batch_size, pin_memory=pin
    )
    return train_loader, val_loader


def _loaders(ctx: FitContext, cache: DecodedCache | None) -> tuple[DataLoader, DataLoader]:
    return training_loaders(
        ctx.split, ctx.pre, ctx.config, ctx.device, ctx.augmentation, ctx.lighting, ctx.ranks,
        cache,
    )  # fmt: skip


def training_loaders(
    split: DatasetSplit,
    pre: Preprocessing,
    config: FitConfig,
    device: torch.device,
    augmentation: Augmentation,
    lighting: Lighting | None,
    ranks: World = ALONE,
    cache: DecodedCache | None = None,
) -> tuple[DataLoader, DataLoader]:
    """The training loader (augmented, shuffled by a seeded generator, or oversampling rarer
    classes with ``balance="oversample"``) and the validation loader (centre crop). In a
    distributed run each rank gets its share: ``batch_size / ranks.size`` images per step from
    a DistributedSampler, and every ``ranks.size``-th validation image. With ``cache``, both
    read decoded images from it instead of decoding files.

    The training loader's ``batch_sampler.set_epoch(epoch)`` seeds the epoch's order and
    augmentation: every batch is augmented from a seed of its own, made of (seed, epoch, rank,
    batch number), so an epoch's batches are the same whatever the number of workers, whether
    they outlive the epoch, and whether the run was resumed."""
    workers = config.num_workers or 0
    prepare_for_workers(workers)
    common = {
        "num_workers": workers,
        "collate_fn": collate_skipping_failed,
        "pin_memory": device.type == "cuda",  # page-locked batches: copied without waiting
        # Workers outlive the epoch: no start-up each epoch, for 2 x num_workers processes
        # held (training and validation). Resume stays exact: the training batches carry
        # their seeds (_SeededBatches), and validation is not random.
        "persistent_workers": workers > 0,
        "prefetch_factor": PREFETCH_BATCHES if workers else None,
    }
    augment = train_transform(pre, augmentation, lighting, seed=config.seed)
    train_set = ImageDataset(split.train, augment, cache)
    train_loader = DataLoader(
        _BatchSeeded(train_set),
        batch_sampler=seeded_batches([s.label for s in split.train], config, ranks),
        # The loader draws its workers' base seed from this generator, never from torch's
        # global one (which dropout uses, and last.pt saves).
        generator=torch.Generator().manual_seed(config.seed),
        **common,
    )
    val_set = ImageDataset(split.val[ranks.rank :: ranks.size], eval_transform(pre), cache)
    val_loader = DataLoader(
        val_set,
        batch_size=config.batch_size // ranks.size,
        shuffle=False,
        generator=torch.Generator().manual_seed(config.seed),
        **common,
    )
    return train_loader, val_loader


def seeded_batches(
    labels: Sequence[int], config: FitConfig, ranks: World = ALONE
) -> _SeededBatches:
    """The training batches over images with these ``labels``: shuffled by a generator seeded
    per epoch (oversampling rarer classes with ``balance="oversample"``; this rank's share
    when distributed), each index paired with its batch's augmentation seed."""
    if config.batch_size % ranks.size:
        raise ConfigError(
            f"batch_size {config.batch_size} does not split over {ranks.size} processes; give "
            f"a multiple of {ranks.size} (it is the global batch, shared by the processes)."
        )
    order = torch.Generator().manual_seed(config.seed)  # the shuffling, reseeded per epoch
    indices = range(len(labels))
    if ranks.distributed:
        if config.balance == "oversample":
            raise ConfigError(
                "--balance oversample is not supported with several processes; use "
                "--balance weighted-loss."
            )
        sampler = DistributedSampler(
            indices, ranks.size, ranks.rank, shuffle=True, seed=config.seed, drop_last=True
        )
    elif config.balance == "oversample":  # each class drawn equally often, with replacement
        counts = np.bincount(labels)
        sampler = WeightedRandomSampler(
            [1.0 / counts[label] for label in labels], len(labels), generator=order
        )
    else:
        sampler = RandomSampler(indices, generator=order)
    batches = BatchSampler(
        sampler, config.batch_size // ranks.size, drop_last=len(labels) > config.batch_size
    )
    return _SeededBatches(batches, order, config.seed, ranks.rank)


class _SeededBatches(Sampler[list[tuple[int, int]]]):
    """Batches of training indices, each index paired with its batch's augmentation seed.

    The seed travels with the indices to whichever process loads the batch (the main one or a
    worker), so the augmentation depends on (seed, epoch, rank, batch number) alone.
    """

    def __init__(self, batches: BatchSampler, order: torch.Generator, seed: int, rank: int):
        self.batches, self.order, self.seed, self.rank = batches, order, seed, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Seed the order and the augmentation of ``epoch``."""
        self.epoch = epoch
        self.order.manual_seed(self.seed * 100_003 + epoch)
        if isinstance(self.batches.sampler, DistributedSampler):
            self.batches.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for number, batch in enumerate(self.batches):
            key = [self.seed, self.epoch, self.rank, number]
            seed = int(np.random.SeedSequence(key).generate_state(1)[0])
            yield [(index, seed) for index in batch]

    def __len__(self) -> int:
        return len(self.batches)


class _BatchSeeded(Dataset):
    """``dataset`` indexed by (index, seed) pairs: a batch's augmentation starts from its seed."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        self.dataset.transform.set_random_seed(keys[0][1])  # ~0.1 ms, once per batch
        return [self.dataset[index] for index, _ in keys]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]
