"""The training loop: one function, readable top to bottom.

Each epoch trains on the training loader (frozen BatchNorm layers kept in eval mode), evaluates
on the validation loader, appends a row to ``metrics.csv``, writes ``last.pt`` and, when the
validation accuracy improved, ``best.pt``. Callers observe progress through ``on_epoch``.
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
from finetune.strategies import set_train_mode

__all__ = ["EpochResult", "evaluate", "train"]


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


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    epochs: int,
    device: torch.device,
    run_dir: Path,
    describe: dict[str, Any],
    progress: bool = True,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> list[EpochResult]:
    """Train ``model`` for ``epochs``; returns one :class:`EpochResult` per epoch.

    Args:
        describe: What the checkpoints must say about the model besides its weights (model spec,
            classes, preprocessing, config, strategy); see :mod:`finetune.checkpoint`.
        progress: Show a progress bar per epoch (only when stderr is a terminal).
    """
    metrics_path = run_dir / "metrics.csv"
    columns = [f.name for f in fields(EpochResult)]
    with metrics_path.open("w", newline="") as f:
        csv.writer(f).writerow(columns)
    history: list[EpochResult] = []
    best_acc, best_loss = -1.0, math.inf
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
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
        is_best = val_acc > best_acc or (val_acc == best_acc and val_loss < best_loss)
        if is_best:
            best_acc, best_loss = val_acc, val_loss
        result = EpochResult(
            epoch=epoch,
            train_loss=total_loss / max(seen, 1),
            train_acc=correct / max(seen, 1),
            val_loss=val_loss,
            val_acc=val_acc,
            lr=optimizer.param_groups[-1]["lr"],
            seconds=time.perf_counter() - start,
            best=is_best,
        )
        history.append(result)
        with metrics_path.open("a", newline="") as f:
            csv.writer(f).writerow(asdict(result).values())
        state = {
            **describe,
            "epoch": epoch,
            "metrics": asdict(result),
            "best_metric": best_acc,
            "state_dict": model.state_dict(),
        }
        if is_best:
            save_checkpoint(run_dir / "best.pt", state)
        save_checkpoint(
            run_dir / "last.pt",
            {
                **state,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            },
        )
        if on_epoch is not None:
            on_epoch(result)
    return history
