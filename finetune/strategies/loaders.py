"""The DataLoaders of a fine-tune: decoded-image cache, frozen-layer outputs when finetune-top can
use them, seeded batch order (the same batches on resume and across torchrun ranks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    WeightedRandomSampler,
)

from finetune.config import FROZEN_CACHE_UP_TO, FitConfig
from finetune.data.decoded import DecodedCache, describe_size
from finetune.data.loaders import ImageDataset, collate_skipping_failed, prepare_for_workers
from finetune.data.scan import DatasetSplit
from finetune.data.transforms import (
    Augmentation,
    Lighting,
    Preprocessing,
    eval_transform,
    train_transform,
)
from finetune.errors import ConfigError
from finetune.model.backbone import autocast
from finetune.model.frozen import (
    FrozenOutputs,
    compute_frozen,
    find_prefix,
    frozen_loader,
    frozen_views,
    run_prefix,
    view_agrees,
)
from finetune.run.checkpoint import FrozenRecord
from finetune.strategies.base import FitContext
from finetune.training.compute import autocast_dtype
from finetune.training.distributed import ALONE, World

__all__ = ["PREFETCH_BATCHES", "training_loaders"]


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
    amp = autocast_dtype(config.precision)
    prefix = find_prefix(ctx.model, example)
    if isinstance(prefix, str):
        return _frozen_off(ctx, prefix)
    if not view_agrees(ctx.model, prefix, example, amp=amp):
        return _frozen_off(
            ctx,
            f"the layers above {prefix.output} do not take its output alone (a skip "
            "connection or arithmetic between modules), so they cannot start from a cache",
        )
    with torch.no_grad(), autocast(ctx.device, amp):
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
        ctx.model, prefix, split.train, val, ctx.pre, views, device=ctx.device, amp=amp,
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
    return outputs


def _frozen_record(frozen: FrozenOutputs) -> FrozenRecord:
    """What the checkpoints record of the frozen layers computed once."""
    views = frozen.train.shape[1]  # (training images, views, ...)
    return FrozenRecord(skipped=tuple(frozen.prefix.skipped), views=views)


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
    read decoded images from it instead of decoding files. Both yield uint8 images, a quarter
    of float32's bytes through the workers' shared memory and the copies to the GPU: whoever
    runs the model on them normalises them on the device with ``DeviceNormalize.of(pre)`` (the
    training loop's ``normalize``).

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
    # uint8 batches, normalised where the model runs (DeviceNormalize): faster on GPUs and on
    # CPUs alike (benchmarks/loader_transport.py, benchmarks/gpu_check.py)
    augment = train_transform(pre, augmentation, lighting, seed=config.seed, normalize=False)
    train_set = ImageDataset(split.train, augment, cache)
    train_loader = DataLoader(
        _BatchSeeded(train_set),
        batch_sampler=seeded_batches([s.label for s in split.train], config, ranks),
        # The loader draws its workers' base seed from this generator, never from torch's
        # global one (which dropout uses, and last.pt saves).
        generator=torch.Generator().manual_seed(config.seed),
        **common,
    )
    val_transform = eval_transform(pre, normalize=False)
    val_set = ImageDataset(split.val[ranks.rank :: ranks.size], val_transform, cache)
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
        self.dataset.transform.set_random_seed(keys[0][1])  # a seed, not a new pipeline
        return [self.dataset[index] for index, _ in keys]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]
