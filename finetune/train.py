"""The training loop: one function, readable top to bottom.

Each epoch trains on the training loader (frozen BatchNorm layers kept in eval mode), evaluates
on the validation loader, and hands the result to a :class:`Recorder`, which appends a row to
``metrics.csv``, writes ``last.pt`` and, when the validation accuracy improved, ``best.pt``.
Callers observe progress through ``on_epoch``.

Faults: a non-finite loss (or non-finite weights after an epoch) abandons the epoch, restores the
weights, optimizer and scheduler of the last good epoch and halves every learning rate, at most
:data:`MAX_RETRIES` times; nothing non-finite is ever written. SIGINT (Ctrl-C) and SIGTERM stop
at the next batch: the half-done epoch is dropped, ``last.pt`` (written atomically after every
epoch) stays valid, and :class:`~finetune.errors.TrainingError` says how to resume.

Resume: every epoch reseeds the loader's shuffling and the augmentation from (seed, epoch), so
``--resume`` continues from ``last.pt`` exactly as an uninterrupted run would have.
"""

from __future__ import annotations

import copy
import csv
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune.checkpoint import save_checkpoint
from finetune.errors import TrainingError
from finetune.models import set_train_mode

__all__ = ["MAX_RETRIES", "EpochResult", "Recorder", "evaluate", "train"]

MAX_RETRIES = 3  # epochs restarted at half the LR after a non-finite loss, before giving up


@dataclass(frozen=True)
class EpochResult:
    """What one epoch measured (one row of metrics.csv)."""

    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float  # head learning rate at the end of the epoch
    seconds: float
    best: bool  # val_acc improved on every earlier epoch


def _batches(loader: DataLoader, device: torch.device):
    for batch in loader:
        if batch is None:  # every image of the batch failed to decode (already warned)
            continue
        images, labels = batch
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` over ``loader``."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in _batches(loader, device):
        logits = model(images)
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.numel()
    return (total_loss / seen, correct / seen) if seen else (math.nan, math.nan)


class Recorder:
    """Writes a run's ``metrics.csv`` rows and its ``best.pt`` / ``last.pt`` checkpoints.

    Args:
        run_dir: The run directory.
        describe: What the checkpoints say about the model besides its weights (model spec,
            classes, preprocessing, config, strategy); see :mod:`finetune.checkpoint`.
    """

    def __init__(
        self, run_dir: Path, describe: dict[str, Any], resumed: dict[str, Any] | None = None
    ) -> None:
        self.run_dir = run_dir
        self.describe = describe
        self.best_acc, self.best_loss = -1.0, math.inf
        self.metrics_path = run_dir / "metrics.csv"
        rows: list[list[str]] = []
        if resumed is not None:  # keep the rows of the epochs last.pt holds, drop any later
            self.best_acc = float(resumed["best_metric"])
            self.best_loss = float(resumed.get("best_loss", math.inf))
            with self.metrics_path.open(newline="") as f:
                rows = [r for r in list(csv.reader(f))[1:] if int(r[0]) <= resumed["epoch"]]
        with self.metrics_path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([f.name for f in fields(EpochResult)])
            writer.writerows(rows)

    def is_best(self, val_acc: float, val_loss: float) -> bool:
        """Would this epoch beat every earlier one (accuracy first, then loss)?"""
        return val_acc > self.best_acc or (val_acc == self.best_acc and val_loss < self.best_loss)

    def record(
        self, result: EpochResult, model: nn.Module, resume_state: dict[str, Any] | None = None
    ) -> None:
        """Append ``result`` to metrics.csv; write best.pt if it is best, and always last.pt."""
        if result.best:
            self.best_acc, self.best_loss = result.val_acc, result.val_loss
        with self.metrics_path.open("a", newline="") as f:
            csv.writer(f).writerow(asdict(result).values())
        state = {
            **self.describe,
            "epoch": result.epoch,
            "metrics": asdict(result),
            "best_metric": self.best_acc,
            "best_loss": self.best_loss,
            "state_dict": model.state_dict(),
        }
        if result.best:
            save_checkpoint(self.run_dir / "best.pt", state)
        save_checkpoint(self.run_dir / "last.pt", {**state, **(resume_state or {})})


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
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())  # fmt: skip


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    epochs: int,
    device: torch.device,
    recorder: Recorder,
    progress: bool = True,
    before_epoch: Callable[[int], None] | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    first_epoch: int = 1,
    reseed: Callable[[int], None] | None = None,
    class_weights: torch.Tensor | None = None,
) -> list[EpochResult]:
    """Train ``model`` for epochs ``first_epoch``..``epochs``; one :class:`EpochResult` each.

    Args:
        recorder: Writes metrics.csv and the checkpoints after each epoch.
        progress: Show a progress bar per epoch (only when stderr is a terminal).
        before_epoch: Called with the 1-based epoch before it starts (e.g. to unfreeze layers).
        on_epoch: Called with each epoch's result once its checkpoints are written.
        first_epoch: Where a resumed run starts (model, optimizer and scheduler already loaded).
        reseed: Called with the epoch before it starts: seeds shuffling and augmentation.
        class_weights: Per-class weights of the training loss (imbalanced classes).

    Raises:
        TrainingError: Ctrl-C / SIGTERM (``last.pt`` holds the last whole epoch), or the loss
            stayed non-finite after :data:`MAX_RETRIES` halvings of the learning rate.
    """
    history: list[EpochResult] = []
    retries = 0
    with _stop_requests() as stop:
        epoch = first_epoch
        while epoch <= epochs:
            good = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
                    copy.deepcopy(scheduler.state_dict()), torch.get_rng_state())  # fmt: skip
            result = _epoch(model, optimizer, scheduler, train_loader, val_loader, epoch, epochs,
                            device, recorder, progress, before_epoch, reseed, stop,
                            class_weights)  # fmt: skip
            if stop:
                raise TrainingError(_interrupted(stop[0], recorder.run_dir, epoch))
            if result is None:  # non-finite: back to the last good state, half the LR
                retries += 1
                if retries > MAX_RETRIES:
                    raise TrainingError(
                        f"The loss became NaN or infinite in epoch {epoch} even after halving "
                        f"the learning rate {MAX_RETRIES} times. Nothing non-finite was saved; "
                        f"{recorder.run_dir / 'last.pt'} holds the last good epoch. Try a lower "
                        "--lr, or check the images for extreme values."
                    )
                model.load_state_dict(good[0])
                optimizer.load_state_dict(good[1])
                scheduler.load_state_dict(good[2])
                torch.set_rng_state(good[3])
                for group in optimizer.param_groups:
                    group["lr"] *= 0.5
                scheduler.base_lrs = [lr * 0.5 for lr in scheduler.base_lrs]
                warnings.warn(
                    f"epoch {epoch}: the loss became non-finite; restarting the epoch from the "
                    f"last good state at half the learning rate (retry {retries}/{MAX_RETRIES})",
                    stacklevel=2,
                )
                continue
            history.append(result)
            recorder.record(
                result,
                model,
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                },
            )
            if on_epoch is not None:
                on_epoch(result)
            epoch += 1
    return history


def _interrupted(signal_name: str, run_dir: Path, epoch: int) -> str:
    if (run_dir / "last.pt").is_file():
        return (
            f"Stopped by {signal_name} during epoch {epoch}; {run_dir / 'last.pt'} holds epoch "
            f"{epoch - 1}. Continue with: finetune fit --resume {run_dir}"
        )
    return f"Stopped by {signal_name} during epoch {epoch}, before any epoch was saved."


def _epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_loader: DataLoader,
    val_loader: DataLoader,
    epoch: int,
    epochs: int,
    device: torch.device,
    recorder: Recorder,
    progress: bool,
    before_epoch: Callable[[int], None] | None,
    reseed: Callable[[int], None] | None,
    stop: list[str],
    class_weights: torch.Tensor | None = None,
) -> EpochResult | None:
    """One epoch of training and validation; ``None`` when the loss or weights went non-finite
    (or a stop was requested, which ``stop`` then says)."""
    start = time.perf_counter()
    if reseed is not None:
        reseed(epoch)
    if before_epoch is not None:
        before_epoch(epoch)
    set_train_mode(model)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(total=len(train_loader), desc=f"epoch {epoch}/{epochs}", unit="batch",
               leave=False, disable=None if progress else True)  # fmt: skip
    try:
        for images, labels in _batches(train_loader, device):
            if stop:
                return None
            logits = model(images)
            loss = F.cross_entropy(logits, labels, weight=class_weights)
            if not torch.isfinite(loss):
                return None
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * labels.numel()
            correct += (logits.argmax(1) == labels).sum().item()
            seen += labels.numel()
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
            bar.update()
    finally:
        bar.close()
    if stop or not _finite(model):
        return None
    val_loss, val_acc = evaluate(model, val_loader, device)
    if stop:
        return None
    return EpochResult(
        epoch=epoch,
        train_loss=total_loss / max(seen, 1),
        train_acc=correct / max(seen, 1),
        val_loss=val_loss,
        val_acc=val_acc,
        lr=optimizer.param_groups[-1]["lr"],
        seconds=time.perf_counter() - start,
        best=recorder.is_best(val_acc, val_loss),
    )
