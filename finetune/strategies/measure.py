"""What ``auto`` measures on the user's images, and the decision it draws from them.

Two measurements place a dataset in the CS231n 2x2 matrix:

- **Data size**: training images per class (median), with the total and the class balance.
- **Similarity to the pretraining data**: the *BatchNorm shift*. Every BatchNorm layer of a
  pretrained backbone stores the mean and variance its input had on the pretraining images. We
  run up to 128 of the user's images through the backbone (eval mode, the model's native input
  size and normalisation, as in pretraining) and measure, per layer and channel, the KL
  divergence between the Gaussian of the activations now and the stored one, averaged over
  channels and layers. Natural photos stay close to ImageNet's statistics, other domains drift;
  benchmarks/similarity.py measures it on real data next to the pretrained classifier's
  confidence (which does not separate them) and shows that where the shift is large, features
  from an earlier stage beat the top features.

The decision also weighs the hardware: on a CPU, fine-tuning strategies get an image size and a
number of epochs that fit a time budget, measured by timing a few training steps here; when not
even MIN_FINETUNE_EPOCHS fit, auto runs the probe of the same row and says so.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import CPU_BUDGET_SECONDS, PROBE_OF
from finetune.data.loaders import ImageDataset, collate_skipping_failed
from finetune.data.scan import DatasetSplit
from finetune.data.transforms import Preprocessing, choose_image_size, eval_transform
from finetune.model.backbone import default_unfreeze, layer_group_count

__all__ = [
    "CPU_BUDGET_SECONDS",
    "LOTS_PER_CLASS",
    "MIN_FINETUNE_EPOCHS",
    "SCORING_SHARE",
    "SIMILAR_BELOW",
    "TRAINING_SHARE",
    "DataSize",
    "Decision",
    "batchnorm_shift",
    "decide",
    "measure_size",
    "pass_seconds",
    "time_per_image",
    "training_epoch_seconds",
]

SIMILAR_BELOW = 0.15  # BatchNorm shift under which images count as similar to ImageNet
LOTS_PER_CLASS = 200  # median training images per class from which there is "a lot of data"
MIN_FINETUNE_EPOCHS = 8  # fewer fit the CPU budget: the probe of the same row instead
# Training ends by this share of the time budget (the trainer keeps to it: training.loop), and
# scoring test-time augmentation by the second; the rest is for the report.
TRAINING_SHARE = 0.85
SCORING_SHARE = 0.95
_CPU_SIZES = (224, 192, 160, 128, 96, 64)  # sizes auto may step down through on a CPU


@dataclass(frozen=True)
class DataSize:
    """How much training data there is."""

    images: int
    classes: int
    per_class_min: int
    per_class_median: float
    per_class_max: int

    @property
    def imbalance(self) -> float:
        """Largest class / smallest class."""
        return self.per_class_max / max(self.per_class_min, 1)


def measure_size(split: DatasetSplit) -> DataSize:
    """Count the training images of ``split`` per class."""
    counts = list(split.counts("train").values())
    return DataSize(
        images=len(split.train),
        classes=len(counts),
        per_class_min=min(counts),
        per_class_median=float(statistics.median(counts)),
        per_class_max=max(counts),
    )


@torch.inference_mode()
def batchnorm_shift(
    backbone: nn.Module,
    split: DatasetSplit,
    pre: Preprocessing,
    device: torch.device,
    limit: int = 128,
    seed: int = 0,
) -> float | None:
    """Mean KL(now || pretraining) of BatchNorm inputs over channels and layers; None if the
    model has no BatchNorm layers."""
    layers = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    layers = [m for m in layers if m.track_running_stats and m.running_var is not None]
    if not layers:
        return None
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(split.train), size=min(limit, len(split.train)), replace=False)
    dataset = ImageDataset([split.train[i] for i in sorted(chosen)], eval_transform(pre))
    batch = collate_skipping_failed([dataset[i] for i in range(len(dataset))])
    if batch is None:
        return None
    sums: dict[nn.Module, list[torch.Tensor]] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        x = inputs[0].float().transpose(0, 1).flatten(1)  # (C, N*H*W)
        sums.setdefault(module, []).append(torch.stack([x.mean(1), (x * x).mean(1)]))

    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = backbone.training
    backbone.eval()
    try:
        for images in batch[0].split(32):
            backbone(images.to(device))
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    kls = []
    for module, parts in sums.items():
        mean, square = torch.stack(parts).mean(0)
        var = (square - mean * mean).clamp_min(0) + module.eps
        ref_mean = module.running_mean.float()
        ref_var = module.running_var.float() + module.eps
        kl = 0.5 * ((var + (mean - ref_mean) ** 2) / ref_var - 1 - torch.log(var / ref_var))
        kls.append(kl.mean().item())
    return float(np.mean(kls))


def time_per_image(
    model: nn.Module,
    size: int,
    device: torch.device,
    train: bool,
    batch: int = 16,
    channels_last: bool = False,
) -> float:
    """Seconds per image of a forward (and backward, if ``train``) pass, timed here, in the
    memory layout the run will use: the layout changes a step's time a lot on a CPU (see
    ``compute.resolve_channels_last``; docs/speed.md has the numbers), so timing another layout
    would mis-size the run."""
    probe = copy.deepcopy(model).to(device)
    probe.train(train)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        probe.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    # The first call warms up allocators and kernels; then the fastest of at least two timed
    # calls, and of more (up to 8) while they take under half a second in all: a short pass
    # timed on a busy machine is otherwise easily several times too slow.
    timings: list[float] = []
    while len(timings) < 3 or (len(timings) < 9 and sum(timings[1:]) < 0.5):
        start = time.perf_counter()
        if train:
            out = probe(x)
            F.cross_entropy(out, torch.zeros(batch, dtype=torch.long, device=device)).backward()
        else:
            with torch.inference_mode():
                probe(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - start)
    return min(timings[1:]) / batch


def pass_seconds(
    model: nn.Module, size: int, device: torch.device, images: int, channels_last: bool = False
) -> float:
    """Expected seconds of one inference pass over ``images`` (a probe's feature pass)."""
    return images * time_per_image(model, size, device, train=False, channels_last=channels_last)


def training_epoch_seconds(
    model: nn.Module,
    size: int,
    device: torch.device,
    train_images: int,
    val_images: int,
    channels_last: bool = False,
) -> float:
    """Expected seconds of one fine-tuning epoch: a training step per training image and a
    validation forward (about a third of a step) per validation image."""
    learn = time_per_image(model, size, device, train=True, channels_last=channels_last)
    return train_images * learn + val_images * learn / 3


@dataclass(frozen=True)
class Decision:
    """The cell auto chose, with the numbers and thresholds that led there."""

    strategy: str
    cell: str  # e.g. "little data, different from ImageNet"
    size: DataSize
    batchnorm_shift: float | None
    settings: dict[str, Any]  # the FitConfig fields auto set (epochs, image_size, unfreeze...)
    estimate_seconds: float  # expected training time on this machine
    reasons: tuple[str, ...]
    thresholds: dict[str, float]  # the limits the measurements were compared with
    # Every hyperparameter the run used (epochs, LRs, unfrozen groups, image size...), filled
    # in once the configuration is resolved.
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    # A fine-tune's baseline: the probe of the same row, fit first at its own image size; the
    # run keeps whichever of the two scores higher on val (strategies.auto.Comparison, filled in
    # as ``kept`` when the fine-tune ends).
    baseline: str | None = None
    baseline_image_size: int | None = None
    kept: dict[str, Any] | None = None
    # The time budget the fine-tune was sized to on a CPU, which the trainer then keeps (None:
    # not sized to one: a GPU, a probe, or the user's epochs or image size)
    budget_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size": {**asdict(self.size), "imbalance": self.size.imbalance}}


def decide(
    split: DatasetSplit,
    backbone: nn.Module,
    *,
    device: torch.device,
    image_size: int | None,
    epochs: int | None,
    batch_size: int,
    seed: int = 0,
    cpu_budget_seconds: float = CPU_BUDGET_SECONDS,
    channels_last: bool = False,
) -> Decision:
    """Measure data size and similarity on ``split`` and choose a strategy and its settings.

    Args:
        image_size: The user's image size, if they set one (auto then keeps it).
        epochs: The user's epoch count, if they set one (auto then keeps it).
        cpu_budget_seconds: On a CPU, about how long a fine-tune may take.
        channels_last: Whether training will run channels_last (its steps are timed so).
    """
    size = measure_size(split)
    limits = {
        "similar_below_batchnorm_shift": SIMILAR_BELOW,
        "lots_from_images_per_class": LOTS_PER_CLASS,
        "cpu_budget_seconds": cpu_budget_seconds,
        "min_finetune_epochs": MIN_FINETUNE_EPOCHS,
    }
    native = Preprocessing.from_model(backbone).input_size
    side = image_size or choose_image_size(native, split.median_side)
    # Similarity is judged as the backbone saw its pretraining images: at its native size.
    shift = batchnorm_shift(backbone, split, Preprocessing.from_model(backbone), device)
    similar = shift is not None and shift < SIMILAR_BELOW
    lots = size.per_class_median >= LOTS_PER_CLASS
    strategy = {
        (False, True): "linear",
        (False, False): "stage-probe",
        (True, True): "finetune-top",
        (True, False): "finetune-all",
    }[(lots, similar)]
    amount = "a lot of" if lots else "little"
    likeness = "similar to" if similar else "different from"
    reasons = [
        f"{size.images} training images, median {size.per_class_median:g} per class "
        f"({'>=' if lots else '<'} {LOTS_PER_CLASS}: {amount} data)",
        (
            "similarity unknown (the model has no BatchNorm statistics): treated as different"
            if shift is None
            else f"BatchNorm shift {shift:.3f} at {native} px ({'<' if similar else '>='} "
            f"{SIMILAR_BELOW}: "
            f"{likeness} ImageNet)"
        ),
    ]
    if size.imbalance >= 5:
        reasons.append(f"classes are imbalanced ({size.imbalance:.1f}x largest/smallest)")
    cell = f"{amount} data, {likeness} ImageNet"
    settings: dict[str, Any] = {"image_size": side}
    n_train, n_val = size.images, len(split.val)
    if not lots:  # probes: one inference pass over the images, no epochs
        seconds = pass_seconds(backbone, side, device, n_train + n_val, channels_last)
        reasons.append(f"a linear probe needs one pass over the images: {side} px input")
        return Decision(strategy, cell, size, shift, settings, seconds, tuple(reasons), limits)

    cores = os.cpu_count() or 1
    chosen_epochs = epochs or (15 if strategy == "finetune-all" else 10)
    budget_seconds = None
    # the probe baseline runs first (a pass over the images at the probe's size), then training
    probe_seconds = pass_seconds(backbone, side, device, n_train + n_val, channels_last)
    for_epochs = cpu_budget_seconds * TRAINING_SHARE - probe_seconds
    if device.type == "cuda" or epochs or image_size:  # the size stays; epochs are timed
        candidate = side
        epoch_seconds = training_epoch_seconds(
            backbone, side, device, n_train, n_val, channels_last
        )
    else:
        # On a CPU: the largest size at which enough epochs fit the budget; if none does,
        # the probe of the same row, which beat a budget-capped fine-tune in the benchmarks.
        for candidate in [s for s in _CPU_SIZES if s <= side] or [side]:
            epoch_seconds = training_epoch_seconds(
                backbone, candidate, device, n_train, n_val, channels_last
            )
            fits = math.floor(max(for_epochs, 0) / epoch_seconds)
            if fits >= MIN_FINETUNE_EPOCHS:
                chosen_epochs = min(chosen_epochs, fits)
                budget_seconds = cpu_budget_seconds
                reasons.append(
                    f"CPU with {cores} cores: {candidate} px and {chosen_epochs} epochs fit the "
                    f"~{cpu_budget_seconds / 60:.0f} min budget ({epoch_seconds:.0f} s per epoch "
                    "measured here); the trainer keeps to it, planning the epochs left again if "
                    "they run slower"
                )
                break
        else:
            probe = PROBE_OF[strategy]
            reasons.append(
                f"but on this CPU ({cores} cores) {MIN_FINETUNE_EPOCHS} epochs of {strategy} take "
                f"~{MIN_FINETUNE_EPOCHS * epoch_seconds / 60:.0f} min even at {candidate} px, "
                f"over the ~{cpu_budget_seconds / 60:.0f} min budget, and a fine-tune cut shorter "
                f"scored below the probe (benchmarks/strategy_matrix.py): {probe} instead; "
                f"--strategy {strategy} fine-tunes anyway, a GPU makes it fast"
            )
            return Decision(
                probe, cell, size, shift, settings, probe_seconds, tuple(reasons), limits
            )
    settings.update(image_size=candidate, epochs=chosen_epochs)
    groups = layer_group_count(backbone)
    if strategy == "finetune-top":
        settings["unfreeze"] = default_unfreeze(groups)
        reasons.append(
            f"similar images need only the top layers adapted: the top {settings['unfreeze']} "
            f"of {groups} layer groups train, the rest stay frozen"
        )
    else:
        reasons.append(
            f"different images need every layer adapted: all {groups} layer groups train"
        )
    baseline = PROBE_OF[strategy]
    reasons.append(
        f"first the {baseline} probe of the same row ({side} px, one pass over the images): the "
        "fine-tune must beat it on val, else the run keeps the probe"
    )
    return Decision(
        strategy, cell, size, shift, settings, chosen_epochs * epoch_seconds + probe_seconds,
        tuple(reasons), limits, baseline=baseline, baseline_image_size=side,
        budget_seconds=budget_seconds,
    )  # fmt: skip
