"""The training loop: one function, readable top to bottom.

Each epoch trains on the training loader (frozen BatchNorm layers kept in eval mode), evaluates
on the validation loader, and hands the result to a :class:`Recorder`, which appends a row to
``metrics.csv``, writes ``last.pt`` and, when the validation accuracy improved, ``best.pt``.
Callers observe progress through ``on_epoch``.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune.checkpoint import save_checkpoint
from finetune.models import set_train_mode

__all__ = ["EpochResult", "Recorder", "evaluate", "train"]


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

    def __init__(self, run_dir: Path, describe: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.describe = describe
        self.best_acc, self.best_loss = -1.0, math.inf
        self.metrics_path = run_dir / "metrics.csv"
        with self.metrics_path.open("w", newline="") as f:
            csv.writer(f).writerow([f.name for f in fields(EpochResult)])

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
            "state_dict": model.state_dict(),
        }
        if result.best:
            save_checkpoint(self.run_dir / "best.pt", state)
        save_checkpoint(self.run_dir / "last.pt", {**state, **(resume_state or {})})


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
) -> list[EpochResult]:
    """Train ``model`` for ``epochs``; returns one :class:`EpochResult` per epoch.

    Args:
        recorder: Writes metrics.csv and the checkpoints after each epoch.
        progress: Show a progress bar per epoch (only when stderr is a terminal).
        before_epoch: Called with the 1-based epoch before it starts (e.g. to unfreeze layers).
        on_epoch: Called with each epoch's result once its checkpoints are written.
    """
    history: list[EpochResult] = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        if before_epoch is not None:
            before_epoch(epoch)
        set_train_mode(model)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(
            total=len(train_loader),
            desc=f"epoch {epoch}/{epochs}",
            unit="batch",
            leave=False,
            disable=None if progress else True,
        )
        for images, labels in _batches(train_loader, device):
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * labels.numel()
            correct += (logits.argmax(1) == labels).sum().item()
            seen += labels.numel()
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
            bar.update()
        bar.close()
        val_loss, val_acc = evaluate(model, val_loader, device)
        result = EpochResult(
            epoch=epoch,
            train_loss=total_loss / max(seen, 1),
            train_acc=correct / max(seen, 1),
            val_loss=val_loss,
            val_acc=val_acc,
            lr=optimizer.param_groups[-1]["lr"],
            seconds=time.perf_counter() - start,
            best=recorder.is_best(val_acc, val_loss),
        )
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
    return history
