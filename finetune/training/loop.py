"""The training loop: one function, readable top to bottom.

Each epoch trains on the training loader (frozen layers kept in eval mode), evaluates the raw
weights on the validation loader (and their moving average, when EMA is on), and hands the
result to a :class:`Recorder`, which appends a row to ``metrics.csv`` and writes the
checkpoints: ``last.pt`` always, ``best.pt`` when the validation accuracy improved, ``ema.pt``
when the average's did, ``snapshot-K.pt`` at the end of each LR cycle. Callers observe progress
through ``on_epoch``. The loop watches the train/val gap (:func:`overfitting`) and stops early
after ``patience`` epochs without a better validation accuracy.

One step: :class:`TrainStep` trains on one batch (forward, loss, backward, optimizer, scheduler
and average) and calls its hooks (:class:`StepHook`, at each :class:`Event`) before and after.
The epochs run it, and so does the LR range test (:mod:`finetune.training.lr_range`, a hook), so
the learning rate it suggests was measured under the precision, layout and loss of the run.

Faults: a non-finite loss (or non-finite weights, or a non-finite validation loss, after an
epoch) abandons the epoch, restores the weights, optimizer, scheduler and average of the last
good epoch and halves every learning rate, at most :data:`MAX_RETRIES` times; nothing
non-finite is ever written, and a non-finite validation loss is never the best. A training step
that runs out of memory stops with a :class:`~finetune.errors.TrainingError` naming
``--batch-size`` and ``--image-size``. SIGINT (Ctrl-C) and
SIGTERM stop at the next batch: the half-done epoch is dropped, ``last.pt`` (written atomically
after every epoch) stays valid, and :class:`~finetune.errors.TrainingError` says how to resume.

Resume: every epoch reseeds the loader's shuffling and the augmentation from (seed, epoch), and
``last.pt`` holds the optimizer, scheduler, average and RNG, so ``--resume`` continues exactly as
an uninterrupted run would have.

Speed: with ``amp`` (bfloat16 or float16) the forward pass and the loss run under
``torch.autocast`` (weights, gradients and optimizer state stay float32; float16 with a gradient
scaler, bfloat16 needs none); with
``channels_last`` the images reach the model in NHWC layout, as its weights are. The loop never
waits on the device inside an epoch except every :data:`SYNC_EVERY` steps, when it reads the
stop and non-finite flags (one collective call for all ranks): losses and accuracies add up on
the device. A non-finite loss is therefore seen up to ``SYNC_EVERY - 1`` steps late, which costs
nothing but those steps: the epoch restarts from the state saved at its start anyway.
"""

from __future__ import annotations

import copy
import csv
import enum
import functools
import io
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune.errors import FinetuneError, TrainingError
from finetune.files import atomic_write
from finetune.model.backbone import autocast, set_train_mode
from finetune.run.checkpoint import CheckpointMeta, save_checkpoint
from finetune.run.layout import RunDir
from finetune.training.distributed import ALONE, World

# fp16: the gradient scaler has found its scale within this many steps (each skipped step
# halves it: 65536 reaches 1 in 16), after which no step should be skipped at the start.
_SCALER_SETTLES = 32
_SCHEDULER_FIRST = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"

# uint8 images -> the model's float input on the device (finetune.data.transforms.DeviceNormalize)
Normalize = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "MAX_RETRIES",
    "OVERFIT_GAP",
    "OVERFIT_WINDOW",
    "SYNC_EVERY",
    "EpochResult",
    "Event",
    "Recorder",
    "StepHook",
    "StepOutput",
    "TrainStep",
    "Training",
    "balanced_class_weights",
    "evaluate",
    "names_memory_options",
    "out_of_memory",
    "overfitting",
    "read_metrics",
    "train",
]

MAX_RETRIES = 3  # epochs restarted at half the LR after a non-finite loss, before giving up
OVERFIT_WINDOW = 3  # epochs without a better val acc while the train/val gap grows: a warning
OVERFIT_GAP = 0.05  # ... by at least this much (accuracy), to at least this much
# Training steps between two reads of the stop / non-finite flags: each read waits for the GPU
# to finish its queued work (and, distributed, is a collective call every rank makes).
SYNC_EVERY = 20


@dataclass(frozen=True)
class EpochResult:
    """What one epoch measured (one row of metrics.csv)."""

    epoch: int  # 1-based
    train_loss: float  # on the augmented training images, in train mode (dropout on)
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float  # head learning rate of the epoch's last step
    seconds: float
    best: bool  # val_acc improved on every earlier epoch
    gap: float = math.nan  # train_acc - val_acc: grows when the model starts to overfit
    ema_val_loss: float = math.nan  # the weights' moving average on val (nan: no EMA)
    ema_val_acc: float = math.nan
    ema_best: bool = False  # ema_val_acc improved on every earlier epoch


def read_metrics(path: Path) -> list[EpochResult]:
    """The rows of a ``metrics.csv`` as :class:`EpochResult` s."""
    kinds = {f.name: f.type for f in fields(EpochResult)}
    convert = {"int": int, "float": float, "bool": lambda v: v == "True"}
    with path.open(newline="") as f:
        return [
            EpochResult(**{k: convert[kinds[k]](v) for k, v in row.items() if k in kinds})
            for row in csv.DictReader(f)
        ]


def overfitting(history: list[EpochResult], window: int = OVERFIT_WINDOW) -> str | None:
    """A warning when the validation accuracy has not improved for ``window`` epochs while the
    train/val accuracy gap grew over them by at least :data:`OVERFIT_GAP` to at least that
    much; ``None`` otherwise."""
    if len(history) <= window:
        return None
    recent = history[-window - 1 :]
    then, now = recent[0].gap, recent[-1].gap
    if any(r.best for r in recent[1:]) or now - then < OVERFIT_GAP or now < OVERFIT_GAP:
        return None
    best = [r for r in history if r.best]
    since = f" (best {best[-1].val_acc:.3f} at epoch {best[-1].epoch})" if best else ""
    return (
        f"epoch {recent[-1].epoch}: the train/val accuracy gap grew from {then:+.3f} to "
        f"{now:+.3f} in {window} epochs while val acc stopped improving{since}: the model is "
        "overfitting. Try stronger --augment, more --weight-decay or --dropout, fewer --epochs, "
        "or --patience to stop early."
    )


@dataclass
class Training:
    """What the loop needs besides the model; built by the fine-tuning strategies."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped after every optimizer step
    train_loader: DataLoader
    val_loader: DataLoader
    epochs: int
    device: torch.device
    class_weights: torch.Tensor | None = None  # per-class loss weights (imbalanced classes)
    label_smoothing: float = 0.0
    ema: ModelEmaV3 | None = None  # moving average of the weights, updated every step
    patience: int | None = None  # early stopping: epochs without a better val acc
    snapshot_epochs: tuple[int, ...] = ()  # after these epochs, snapshot-K.pt (LR cycle ends)
    before_epoch: Callable[[int], None] | None = None  # e.g. unfreeze after a warm-up
    reseed: Callable[[int], None] | None = None  # seeds shuffling and augmentation per epoch
    say: Callable[[str], None] = lambda message: None  # a line for people (early stopping)
    ranks: World = ALONE  # the training processes (torchrun); one by default
    # The model as it runs forward: DistributedDataParallel and/or torch.compile around it.
    # Checkpoints and the average always come from the unwrapped, uncompiled model.
    wrapped: nn.Module | None = None
    # forward and loss under autocast to this dtype (training and evaluation); None: fp32
    amp: torch.dtype | None = None
    # float16: scales the loss against gradient underflow; kept across epochs, saved in last.pt
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False  # images in NHWC layout (the model converted by the caller)
    # uint8 batches (the training loaders') -> the model's float input, on the device
    # (data.transforms.DeviceNormalize); None: the loaders yield the model's input already.
    normalize: Normalize | None = None
    sync_every: int = SYNC_EVERY  # steps between two reads of the stop / non-finite flags
    # The part of a model (or of its average) that runs on what the loaders yield, when they
    # yield the frozen layers' outputs (finetune.model.frozen) rather than images; None: all of it.
    view: Callable[[nn.Module], nn.Module] | None = None
    # The time budget: training ends by this time.perf_counter() value (None: no budget). After
    # each epoch the epochs left are planned again at the speed of the last one; an epoch still
    # running at the deadline is cut short, validated and recorded, and the run ends there.
    deadline: float | None = None
    # Shortens the LR schedule to end with the given epoch, when the budget cuts the epochs.
    replan: Callable[[int], None] | None = None


def _batches(
    loader: DataLoader,
    device: torch.device,
    channels_last: bool = False,
    normalize: Normalize | None = None,
):
    layout = torch.channels_last if channels_last else torch.preserve_format
    for batch in loader:
        if batch is None:  # every image of the batch failed to decode (already warned)
            continue
        images, labels = batch
        # non_blocking: from pinned memory the copy overlaps the work already queued on the GPU
        # (frozen layers' outputs need not be 4-D, and only 4-D tensors have an NHWC layout)
        memory_format = layout if images.ndim == 4 else torch.preserve_format
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        if normalize is not None:  # uint8 images from the training loaders, on the device
            images = normalize(images)
        elif images.dtype == torch.uint8:
            raise TypeError("uint8 images reached the model: pass the loaders' normalize")
        yield images, labels.to(device, non_blocking=True)


def balanced_class_weights(
    labels: Sequence[int], num_classes: int, device: torch.device
) -> torch.Tensor:
    """Each class's loss weight, 1 / its frequency in ``labels`` (scikit-learn's "balanced"):
    what ``balance="weighted-loss"`` gives the loss, so that rare classes count as much.

    scikit-learn refuses a class with no training images; such a class gets the weight of a
    class with one image, and the present classes' weights are rescaled by present / all
    classes, so every weight is ``len(labels) / (num_classes * count)`` as before.
    """
    from sklearn.utils.class_weight import compute_class_weight  # slow to import; rarely used

    labels = np.asarray(labels)
    present = np.unique(labels)
    weights = np.full(num_classes, len(labels) / num_classes, dtype=np.float64)
    weights[present] = (
        compute_class_weight("balanced", classes=present, y=labels) * len(present) / num_classes
    )
    return torch.tensor(weights, dtype=torch.float32, device=device)


class Event(enum.Enum):
    """When :class:`TrainStep` calls its hooks. An enum, so a misspelt event is an
    ``AttributeError`` instead of a hook that silently never runs."""

    BEFORE_STEP = "before_step"  # the batch is on the device, nothing computed: set LRs here
    AFTER_STEP = "after_step"  # the optimizer and scheduler have stepped: the loss is known


@dataclass(frozen=True)
class StepOutput:
    """What one training step computed, detached (holding it keeps no graph alive)."""

    loss: torch.Tensor  # the batch's mean loss, float32 on the device: reading it waits for it
    logits: torch.Tensor  # float32
    lr: float  # the learning rate of the last (head) group that this step used


class StepHook(Protocol):
    """Code run around every :class:`TrainStep`, as a callback on fastai's single loop is: the
    LR range test (:class:`finetune.training.lr_range.LRFinder`) is one."""

    def __call__(self, event: Event, step: TrainStep, out: StepOutput | None) -> bool:
        """React to ``event`` (``out`` is None before the step); True asks whoever drives the
        steps to stop after this one (``step.stopped`` becomes True)."""
        ...


@dataclass
class TrainStep:
    """One optimizer step on one batch: the only code that computes a training loss. ``fit``'s
    epochs (:func:`train`) and ``lr_find``'s range test both run it, so the range test measures
    the loss under the numerics the run trains with.

    With ``amp`` the forward pass and the loss run under autocast to that dtype (weights,
    gradients and optimizer state stay float32); with ``scaler`` (float16) the loss is scaled
    before backward and the gradients unscaled before the step, which the scaler skips when they
    overflowed. The loss is cross-entropy
    with the run's class weights and label smoothing; then come backward, the optimizer step, the
    scheduler step and the moving average's update. A non-finite loss is not acted on here, as
    looking at it would wait for the device: ``finite`` keeps the record on the device, and
    whoever drives the steps decides (the epoch loop restarts the epoch; the range test stops).
    """

    model: nn.Module  # the unwrapped model: its train mode, and what the average follows
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp: torch.dtype | None = None  # forward and loss under autocast to this dtype
    scaler: torch.amp.GradScaler | None = None  # float16: gradient scaling
    channels_last: bool = False  # batches() in NHWC layout (the model converted by the caller)
    normalize: Normalize | None = None  # batches(): uint8 images -> the model's input
    class_weights: torch.Tensor | None = None  # per-class loss weights (imbalanced classes)
    label_smoothing: float = 0.0
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # stepped after each step
    ema: ModelEmaV3 | None = None  # moving average of the weights, updated after each step
    # What runs forward: DistributedDataParallel, torch.compile or a view around the model
    # (see Training.wrapped); None: the model itself.
    net: nn.Module | None = None
    hooks: Sequence[StepHook] = ()
    steps: int = 0  # optimizer steps so far: the average's warm-up counts them
    stopped: bool = False  # a hook asked to stop
    finite: torch.Tensor = field(init=False)  # every loss so far was finite (on the device)

    def __post_init__(self) -> None:
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)

    def batches(self, loader: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``loader``'s batches on the device, in this step's layout (empty ones skipped)."""
        return _batches(loader, self.device, self.channels_last, self.normalize)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """Train on one batch (from :meth:`batches`); its loss, logits and learning rate.

        Raises:
            TrainingError: The step ran out of memory (the message names the options that
                lower it, with their values).
        """
        try:
            return self._step(images, labels)
        except (RuntimeError, MemoryError) as exc:
            if not out_of_memory(exc):
                raise
            raise TrainingError(_out_of_memory_advice(images, self.device)) from exc

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        self._fire(Event.BEFORE_STEP, None)
        # Not `self.net or self.model`: a compiled module's truth value is its len(), which a
        # model does not have.
        net = self.net if self.net is not None else self.model
        with autocast(self.device, self.amp):
            logits = net(images).float()
            loss = F.cross_entropy(
                logits, labels, weight=self.class_weights, label_smoothing=self.label_smoothing
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:  # a step whose gradients overflowed is skipped and the scale lowered
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        lr = self.optimizer.param_groups[-1]["lr"]  # what this step used
        if self.scheduler is not None:
            self._scheduler_step()
        self.steps += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.steps)
        loss = loss.detach()
        self.finite &= torch.isfinite(loss)
        out = StepOutput(loss=loss, logits=logits.detach(), lr=lr)
        self._fire(Event.AFTER_STEP, out)
        return out

    def _scheduler_step(self) -> None:
        """The scheduler counts batches, skipped steps too. The scaler skips the first steps,
        whose gradients overflow while it lowers its scale from 65536, and PyTorch warns
        about a scheduler stepping before its optimizer ever has: expected here, so not said."""
        if self.scaler is None or self.steps >= _SCALER_SETTLES:
            self.scheduler.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _SCHEDULER_FIRST, UserWarning)
            self.scheduler.step()

    def _fire(self, event: Event, out: StepOutput | None) -> None:
        asks = [hook(event, self, out) for hook in self.hooks]  # every hook runs, whatever
        self.stopped = self.stopped or any(asks)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device (or the host) ran out of memory: torch's
    ``OutOfMemoryError`` (CUDA), a CPU allocator's ``RuntimeError`` or a ``MemoryError``."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        words in text for words in ("out of memory", "can't allocate memory", "cannot allocate")
    )


def names_memory_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a pipeline entry point (fit, resume, plan, lr_find): running out of memory anywhere
    in it (auto's timing pass, a probe's feature pass, evaluation, not only a training step,
    which says more itself) raises a :class:`TrainingError` naming the options that lower
    memory, instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (RuntimeError, MemoryError) as exc:
            if isinstance(exc, FinetuneError) or not out_of_memory(exc):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainingError(
                f"Out of memory ({first[:200]}): lower --image-size or --batch-size, or use "
                "--precision bf16 (or fp16) on a GPU."
            ) from exc

    return wrapper


def _out_of_memory_advice(images: torch.Tensor, device: torch.device) -> str:
    """Which options lower a training step's memory, with the values this step had."""
    batch = images.shape[0] if images.ndim else 1
    # The frozen layers' outputs (finetune-top's cache) are not images: no size to say.
    size = f" of {images.shape[-2]}x{images.shape[-1]} px" if images.ndim == 4 else ""
    return (
        f"Out of memory on {device} in a training step of {batch} images{size}: lower "
        f"--batch-size (this step had {batch}) or --image-size, or use --precision bf16 (or "
        "fp16) on a GPU; on a GPU, --auto-batch-size finds the largest batch that fits."
    )


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    ranks: World = ALONE,
    *,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    normalize: Normalize | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` over ``loader`` (over every rank's
    ``loader`` when distributed: each holds its shard).

    Args:
        amp: Run the forward pass under autocast to this dtype (as training did).
        channels_last: Give the model NHWC images (as training did).
        normalize: Turns the loader's uint8 images into the model's input on the device
            (:class:`~finetune.data.transforms.DeviceNormalize`); None: they are already.
    """
    sums = _evaluate_sums(model, loader, device, amp, channels_last, normalize)
    total_loss, correct, seen = ranks.sum(sums, device)
    return (total_loss / seen, correct / seen) if seen else (math.nan, math.nan)


@torch.inference_mode()
def _evaluate_sums(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: torch.dtype | None,
    channels_last: bool,
    normalize: Normalize | None,
) -> list[float]:
    model.eval()
    total_loss, correct, seen = _zero(device), _zero(device), 0  # sums stay on the device
    for images, labels in _batches(loader, device, channels_last, normalize):
        with autocast(device, amp):
            logits = model(images).float()
        total_loss += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.numel()
    return [*torch.stack([total_loss, correct]).tolist(), float(seen)]  # one wait for the device


def _zero(device: torch.device) -> torch.Tensor:
    """A float64 sum on ``device``: adding a batch's loss or count to it needs no sync."""
    return torch.zeros((), dtype=torch.float64, device=device)


class Recorder:
    """Writes a run's ``metrics.csv`` rows and its checkpoints: ``last.pt`` every epoch,
    ``best.pt`` / ``ema.pt`` when the raw / averaged weights scored their best val accuracy,
    ``snapshot-K.pt`` when asked.

    Args:
        run_dir: The run directory.
        meta: What the checkpoints say about the model besides its weights (model spec,
            classes, preprocessing, config, strategy); see :mod:`finetune.run.checkpoint`.
        resumed: ``last.pt`` of the run being resumed: its rows of metrics.csv are kept (any
            later ones dropped) and its best scores carry on.
        write: False: keep the scores but write nothing (the ranks other than 0 of a
            distributed run).
    """

    def __init__(
        self,
        run_dir: Path,
        meta: CheckpointMeta,
        resumed: dict[str, Any] | None = None,
        write: bool = True,
    ) -> None:
        self.run_dir = run_dir
        self.run = RunDir(run_dir)
        self.meta = meta
        self.write = write
        self.best_acc, self.best_loss, self.best_epoch = -1.0, math.inf, 0
        self.ema_best_acc, self.ema_best_loss = -1.0, math.inf
        self.metrics_path = self.run.metrics
        self.history: list[EpochResult] = []
        if resumed is not None:  # keep the rows of the epochs last.pt holds, drop any later
            self.history = [
                r for r in read_metrics(self.metrics_path) if r.epoch <= resumed["epoch"]
            ]
            self.best_acc = float(resumed["best_metric"])
            self.best_loss = float(resumed.get("best_loss", math.inf))
            self.best_epoch = max((r.epoch for r in self.history if r.best), default=0)
            self.ema_best_acc = float(resumed.get("ema_best_metric", -1.0))
            self.ema_best_loss = float(resumed.get("ema_best_loss", math.inf))
        if write:
            self._write_metrics()

    def _write_metrics(self) -> None:
        """metrics.csv, whole: rewritten atomically each epoch (a few rows), so a run killed
        mid-write keeps the rows of its finished epochs."""
        text = io.StringIO()  # csv's own line ends ("\r\n"), as the file always had
        writer = csv.writer(text)
        writer.writerow([f.name for f in fields(EpochResult)])
        writer.writerows(asdict(r).values() for r in self.history)
        atomic_write(self.metrics_path, text.getvalue())

    def is_best(self, val_acc: float, val_loss: float) -> bool:
        """Would this epoch beat every earlier one (accuracy first, then loss)? Never with a
        non-finite loss: such weights predict NaN probabilities, whatever their accuracy."""
        if not math.isfinite(val_loss):
            return False
        return val_acc > self.best_acc or (val_acc == self.best_acc and val_loss < self.best_loss)

    def is_ema_best(self, val_acc: float, val_loss: float) -> bool:
        """Would the average's score beat its every earlier one (never with a non-finite
        loss)?"""
        if not math.isfinite(val_loss):
            return False
        return val_acc > self.ema_best_acc or (
            val_acc == self.ema_best_acc and val_loss < self.ema_best_loss
        )

    def record(
        self,
        result: EpochResult,
        model: nn.Module,
        resume_state: dict[str, Any] | None = None,
        *,
        ema_model: nn.Module | None = None,
        snapshot: int | None = None,
    ) -> None:
        """Append ``result`` to metrics.csv; write best.pt if it is best, ema.pt if the
        average's is, ``snapshot-{snapshot}.pt`` if asked, and always last.pt."""
        if result.best:
            self.best_acc, self.best_loss, self.best_epoch = (
                result.val_acc, result.val_loss, result.epoch)  # fmt: skip
        if result.ema_best:
            self.ema_best_acc, self.ema_best_loss = result.ema_val_acc, result.ema_val_loss
        self.history.append(result)
        if not self.write:
            return
        self._write_metrics()
        state = {
            **self.meta.to_dict(),
            "epoch": result.epoch,
            "metrics": asdict(result),
            "best_metric": self.best_acc,
            "best_loss": self.best_loss,
            "state_dict": _plain(model),
        }
        if result.best:
            save_checkpoint(self.run.best, state)
        if ema_model is not None and result.ema_best:
            save_checkpoint(
                self.run.ema,
                {**state, "weights": "ema", "best_metric": self.ema_best_acc,
                 "best_loss": self.ema_best_loss, "state_dict": _plain(ema_model)},
            )  # fmt: skip
        if snapshot is not None:
            save_checkpoint(self.run.snapshot(snapshot), {**state, "snapshot": snapshot})
        resume = {
            "ema_best_metric": self.ema_best_acc,
            "ema_best_loss": self.ema_best_loss,
            **({"ema_state_dict": _plain(ema_model)} if ema_model is not None else {}),
            **(resume_state or {}),
        }
        save_checkpoint(self.run.last, {**state, **resume})


def _plain(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state_dict in the standard (contiguous) layout, whatever memory format it
    trained in: checkpoints load anywhere and export to safetensors as they are."""
    state = model.state_dict()  # a new OrderedDict each call; its _metadata is kept
    for name, tensor in state.items():
        state[name] = tensor.contiguous()
    return state


@contextmanager
def _stop_requests() -> Iterator[list[str]]:
    """While inside, SIGINT and SIGTERM only record their name in the yielded list."""
    requested: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested  # signals can only be handled in the main thread
        return

    def handle(signum: int, _frame: Any) -> None:
        requested.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _finite(model: nn.Module) -> bool:
    flags = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True  # one wait for the device


def _abandon(
    t: Training, stop: list[str], finite: torch.Tensor, model: nn.Module | None = None
) -> bool:
    """Whether to drop the epoch: a stop was requested, or a loss (and, given ``model``, a
    weight of it or of its average) was non-finite, on any rank. Waits for the device, and
    when distributed is a collective call that every rank must make at the same step."""
    diverged = not bool(finite)
    if model is not None and not diverged:
        diverged = not _finite(model) or (t.ema is not None and not _finite(t.ema.module))
    stopping, diverged = t.ranks.any([bool(stop), diverged], t.device)
    if stopping and not stop:
        stop.append("a stop on another rank")
    return stopping or diverged


def train(
    model: nn.Module,
    training: Training,
    recorder: Recorder,
    *,
    progress: bool = True,
    on_epoch: Callable[[EpochResult], None] | None = None,
    first_epoch: int = 1,
) -> list[EpochResult]:
    """Train ``model`` for epochs ``first_epoch``..``training.epochs``; one
    :class:`EpochResult` each (fewer when early stopping ends the run).

    Args:
        training: Optimizer, scheduler, loaders and the options of the loop.
        recorder: Writes metrics.csv and the checkpoints after each epoch.
        progress: Show a progress bar per epoch (only when stderr is a terminal).
        on_epoch: Called with each epoch's result once its checkpoints are written.
        first_epoch: Where a resumed run starts (model, optimizer, scheduler, EMA loaded).

    Raises:
        TrainingError: Ctrl-C / SIGTERM (``last.pt`` holds the last whole epoch), or the loss
            stayed non-finite after :data:`MAX_RETRIES` halvings of the learning rate.
    """
    t = training
    history: list[EpochResult] = []
    retries, warned = 0, False
    with _stop_requests() as stop:
        epoch = first_epoch
        while epoch <= t.epochs:
            good = _state(model, t)
            result = _epoch(model, t, recorder, epoch, progress, stop)
            if t.ranks.any([bool(stop)], t.device)[0]:
                raise TrainingError(_interrupted((stop or ["a stop on another rank"])[0],
                                                 recorder.run_dir, epoch))  # fmt: skip
            if result is None:  # non-finite: back to the last good state, half the LR
                retries += 1
                if retries > MAX_RETRIES:
                    raise TrainingError(_diverged(recorder, epoch))
                _restore(model, t, good)
                for group in t.optimizer.param_groups:
                    group["lr"] *= 0.5
                t.scheduler.base_lrs = [lr * 0.5 for lr in t.scheduler.base_lrs]
                warnings.warn(
                    f"epoch {epoch}: the loss (training or validation) became non-finite; "
                    "restarting the epoch from the last good state at half the learning rate "
                    f"(retry {retries}/{MAX_RETRIES})",
                    stacklevel=2,
                )
                continue
            best_epoch = epoch if result.best else recorder.best_epoch
            stopping = t.patience is not None and epoch - best_epoch >= t.patience
            history.append(result)
            recorder.record(
                result,
                model,
                {
                    "optimizer": t.optimizer.state_dict(),
                    "scheduler": t.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    **({"scaler": t.scaler.state_dict()} if t.scaler is not None else {}),
                    **({"stopped_early": epoch} if stopping else {}),
                },
                ema_model=t.ema.module if t.ema is not None else None,
                snapshot=t.snapshot_epochs.index(epoch) + 1 if epoch in t.snapshot_epochs else None,
            )
            if on_epoch is not None:
                on_epoch(result)
            warning = overfitting(recorder.history)
            if warning and not warned:
                warnings.warn(warning, stacklevel=2)
                warned = True
            if stopping:
                t.say(
                    f"early stop: no better val acc in the {t.patience} epochs since epoch "
                    f"{best_epoch}; best.pt holds that epoch"
                )
                break
            deadline = t.deadline if epoch < t.epochs else None
            if deadline is not None and _keep_budget(t, result, best_epoch, deadline):
                break
            epoch += 1
    return history


def _keep_budget(t: Training, result: EpochResult, best_epoch: int, deadline: float) -> bool:
    """Plan the epochs left again at the speed of the one just ended (another process on the
    machine, a throttled CPU): fewer epochs, with the LR schedule shortened to end with them,
    when the planned ones would end past the deadline. True: not one more epoch fits, stop."""
    left = deadline - time.perf_counter()
    fits = math.floor(left / max(result.seconds, 1e-9)) if left > 0 else 0
    fits = int(t.ranks.sum([float(fits)], t.device)[0]) // t.ranks.size  # one plan for all ranks
    epoch = result.epoch
    if fits <= 0:
        t.say(
            f"budget    stopped after epoch {epoch} of {t.epochs}: another epoch (~"
            f"{result.seconds:.0f}s at the speed of the last) would end past the time budget; "
            f"best.pt holds epoch {best_epoch} (fit --resume RUN trains the planned epochs)"
        )
        return True
    if epoch + fits < t.epochs:
        planned, t.epochs = t.epochs, epoch + fits
        if t.replan is not None:
            t.replan(t.epochs)
        t.say(
            f"budget    epochs take ~{result.seconds:.0f}s now: {t.epochs} epochs fit the time "
            f"budget, not {planned}; the LR schedule now ends with epoch {t.epochs}"
        )
    return False


def _past(deadline: float | None, t: Training) -> bool:
    """Whether ``deadline`` has passed, on any rank (all of them stop together)."""
    if deadline is None:
        return False
    return bool(t.ranks.any([time.perf_counter() > deadline], t.device)[0])


def _state(model: nn.Module, t: Training) -> dict[str, Any]:
    """Everything an epoch changes, to return to after a non-finite loss."""
    return {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(t.optimizer.state_dict()),
        "scheduler": copy.deepcopy(t.scheduler.state_dict()),
        "ema": copy.deepcopy(t.ema.module.state_dict()) if t.ema is not None else None,
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "rng": torch.get_rng_state(),
    }


def _restore(model: nn.Module, t: Training, good: dict[str, Any]) -> None:
    model.load_state_dict(good["model"])
    t.optimizer.load_state_dict(good["optimizer"])
    t.scheduler.load_state_dict(good["scheduler"])
    if t.ema is not None:
        t.ema.module.load_state_dict(good["ema"])
    if t.scaler is not None:
        t.scaler.load_state_dict(good["scaler"])
    torch.set_rng_state(good["rng"])


def _diverged(recorder: Recorder, epoch: int) -> str:
    """What to say when the loss stayed non-finite: which checkpoint holds the last good
    epoch, only if one was written (a run that diverges in its first epoch has none)."""
    last = recorder.run.last
    kept = (
        f"{last} holds the last good epoch ({epoch - 1})"
        if epoch > 1 and last.is_file()  # written after every good epoch, this one's previous
        else "no epoch finished with finite losses, so no checkpoint was written"
    )
    return (
        f"The loss became NaN or infinite in epoch {epoch} even after halving the learning "
        f"rate {MAX_RETRIES} times. Nothing non-finite was saved; {kept}. Try a lower --lr, "
        "or check the images for extreme values."
    )


def _interrupted(signal_name: str, run_dir: Path, epoch: int) -> str:
    last = RunDir(run_dir).last
    if last.is_file():
        return (
            f"Stopped by {signal_name} during epoch {epoch}; {last} holds epoch "
            f"{epoch - 1}. Continue with: finetune fit --resume {run_dir}"
        )
    return f"Stopped by {signal_name} during epoch {epoch}, before any epoch was saved."


def _epoch(
    model: nn.Module,
    t: Training,
    recorder: Recorder,
    epoch: int,
    progress: bool,
    stop: list[str],
) -> EpochResult | None:
    """One epoch of training and validation; ``None`` when the training loss, the weights or
    the validation loss went non-finite (or a stop was requested, which ``stop`` then says)."""
    start = time.perf_counter()
    if t.reseed is not None:
        t.reseed(epoch)
    if t.before_epoch is not None:
        t.before_epoch(epoch)
    set_train_mode(model)
    # net=t.wrapped: DistributedDataParallel, there, averages the gradients over the ranks.
    run = TrainStep(
        model, t.optimizer, t.device, amp=t.amp, scaler=t.scaler, channels_last=t.channels_last,
        normalize=t.normalize, class_weights=t.class_weights, label_smoothing=t.label_smoothing,
        scheduler=t.scheduler, ema=t.ema, net=t.wrapped,
        steps=t.scheduler.last_epoch,  # optimizer steps so far (the scheduler counts them)
    )  # fmt: skip
    if t.wrapped is not None:  # a view's containers are copies: their modes follow the model's
        set_train_mode(t.wrapped)
    total_loss, correct, seen = _zero(t.device), _zero(t.device), 0  # sums stay on the device
    lr = t.optimizer.param_groups[-1]["lr"]
    bar = tqdm(total=len(t.train_loader), desc=f"epoch {epoch}/{t.epochs}", unit="batch",
               leave=False, disable=None if progress else True)  # fmt: skip
    try:
        for n, (images, labels) in enumerate(run.batches(t.train_loader), start=1):
            if stop and not t.ranks.distributed:  # alone, a stop costs no sync to see
                return None
            out = run(images, labels)
            lr = out.lr
            total_loss += out.loss.double() * labels.numel()
            correct += (out.logits.argmax(1) == labels).sum()
            seen += labels.numel()
            bar.update()
            if n % t.sync_every == 0:  # every rank has as many batches: all reach this together
                if _abandon(t, stop, run.finite):
                    return None
                if not bar.disable:
                    sums = torch.stack([total_loss, correct]).tolist()
                    bar.set_postfix(loss=f"{sums[0] / seen:.3f}", acc=f"{sums[1] / seen:.3f}")
            # alone, a look at the clock after every step; with ranks, at the sync points
            if (not t.ranks.distributed or n % t.sync_every == 0) and _past(t.deadline, t):
                t.say(
                    f"budget    epoch {epoch} cut at batch {n} of {len(t.train_loader)}: the "
                    "time budget is spent; it is validated and the run ends with it"
                )
                t.deadline = time.perf_counter()  # the loop stops after this epoch
                break
    finally:
        bar.close()
    if _abandon(t, stop, run.finite, model):
        return None
    total_loss, correct, seen = t.ranks.sum(
        [*torch.stack([total_loss, correct]).tolist(), float(seen)], t.device
    )
    t.ranks.sync_buffers(model)
    speed = {"amp": t.amp, "channels_last": t.channels_last, "normalize": t.normalize}
    view = t.view or (lambda module: module)
    val_loss, val_acc = evaluate(view(model), t.val_loader, t.device, t.ranks, **speed)
    ema_loss, ema_acc = (
        evaluate(view(t.ema.module), t.val_loader, t.device, t.ranks, **speed)
        if t.ema is not None
        else (math.nan,) * 2
    )
    if stop:
        return None
    if not math.isfinite(val_loss) and math.isfinite(val_acc):
        # Finite weights can still give infinite logits (an LR far too high): validation
        # images were scored and their loss is NaN or infinite, so the model is no good.
        return None
    train_acc = correct / max(seen, 1)
    return EpochResult(
        epoch=epoch,
        train_loss=total_loss / max(seen, 1),
        train_acc=train_acc,
        val_loss=val_loss,
        val_acc=val_acc,
        lr=lr,
        seconds=time.perf_counter() - start,
        best=recorder.is_best(val_acc, val_loss),
        gap=train_acc - val_acc,
        ema_val_loss=ema_loss,
        ema_val_acc=ema_acc,
        ema_best=t.ema is not None and recorder.is_ema_best(ema_acc, ema_loss),
    )
