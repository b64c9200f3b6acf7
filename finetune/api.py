"""``finetune.fit``: folder -> dataset -> transforms -> model -> strategy -> trainer -> checkpoint.

Read this function top to bottom to follow a run; each step is one call into its own module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune.config import FitConfig
from finetune.data import DatasetSplit, ImageDataset, collate_skipping_failed, scan_folder
from finetune.errors import ConfigError
from finetune.models import EMBEDDED_WEIGHTS, create_backbone, create_classifier
from finetune.strategies import get_strategy
from finetune.train import EpochResult, train
from finetune.transforms import Preprocessing, choose_image_size, eval_transform, train_transform

__all__ = ["FitResult", "fit"]

_DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-2}


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` produced."""

    dir: Path  # the run directory
    classes: tuple[str, ...]
    strategy: str
    config: FitConfig  # the values actually used (image size, lr, device... resolved)
    history: tuple[EpochResult, ...]
    seconds: float
    skipped: tuple[tuple[Path, str], ...]  # files that were not usable images, and why

    @property
    def best(self) -> EpochResult:
        """The epoch whose weights are in ``best.pt``."""
        return [r for r in self.history if r.best][-1]

    @property
    def best_metric(self) -> float:
        """Best validation accuracy."""
        return self.best.val_acc

    @property
    def best_checkpoint(self) -> Path:
        return self.dir / "best.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.dir / "last.pt"


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"Unknown device {name!r}; use cpu, cuda or cuda:N.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {name!r} asked for, but torch sees no CUDA GPU here; use cpu.")
    return device


def _num_workers(requested: int | None) -> int:
    if requested is not None:
        return requested
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores - 1)


def _run_dir(config: FitConfig, root: Path) -> Path:
    if config.out is not None:
        run_dir = Path(config.out).expanduser()
        if (run_dir / "last.pt").exists():
            raise ConfigError(
                f"{run_dir} already holds a run (last.pt); choose another --out or remove it."
            )
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path("runs") / f"{root.resolve().name}-{config.strategy}-{stamp}"
        run_dir, n = base, 1
        while run_dir.exists():
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _optimizer(groups: list[dict[str, Any]], config: FitConfig) -> torch.optim.Optimizer:
    """Split each group into decayed weights and undecayed norms/biases (ndim <= 1)."""
    param_groups = []
    for group in groups:
        decay = [p for p in group["params"] if p.ndim > 1]
        no_decay = [p for p in group["params"] if p.ndim <= 1]
        for params, wd in ((decay, config.weight_decay), (no_decay, 0.0)):
            if params:
                param_groups.append({**group, "params": params, "weight_decay": wd})
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=config.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(param_groups, lr=config.lr)


def _loaders(
    split: DatasetSplit, pre: Preprocessing, config: FitConfig, device: torch.device
) -> tuple[DataLoader, DataLoader]:
    workers = config.num_workers or 0
    common = {
        "batch_size": config.batch_size,
        "num_workers": workers,
        "collate_fn": collate_skipping_failed,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0,
    }
    train_set = ImageDataset(split.train, train_transform(pre, seed=config.seed))
    train_loader = DataLoader(
        train_set,
        shuffle=True,
        drop_last=len(split.train) > config.batch_size,
        generator=torch.Generator().manual_seed(config.seed),
        worker_init_fn=_seed_worker_augmentation,
        **common,
    )
    val_loader = DataLoader(ImageDataset(split.val, eval_transform(pre)), shuffle=False, **common)
    return train_loader, val_loader


def _seed_worker_augmentation(worker_id: int) -> None:
    """Give each DataLoader worker its own, reproducible augmentation stream."""
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


def fit(
    data: str | Path,
    config: FitConfig | None = None,
    *,
    head: nn.Module | None = None,
    verbose: bool = True,
    **options: Any,
) -> FitResult:
    """Train a classifier on a folder of labelled images.

    Args:
        data: A folder with one sub-folder per class (or ``train/`` and ``val/`` trees).
        config: Base configuration; ``options`` override its fields (see :class:`FitConfig`).
        head: A custom head: any ``nn.Module`` mapping (N, num_features) to (N, num_classes).
        verbose: Print what was decided and one line per epoch to stderr, with progress bars.
        **options: Fields of :class:`FitConfig`, e.g. ``strategy="finetune-all", epochs=3``.

    Returns:
        A :class:`FitResult`; the run directory holds best.pt, last.pt, metrics.csv,
        config.json and classes.json.

    Example:
        >>> run = finetune.fit("sample_data/fashion", strategy="linear", epochs=3)
        >>> print(run.best_metric, run.dir)
    """
    started = time.perf_counter()
    config = FitConfig.from_kwargs(config, **options)
    strategy = get_strategy(config.strategy)
    _seed_everything(config.seed)

    split = scan_folder(data, val_split=config.val_split, seed=config.seed)
    _say(
        verbose,
        f"data      {split.root}: {len(split.classes)} classes, {len(split.train)} train / "
        f"{len(split.val)} val images ({split.layout})"
        + (f", {len(split.skipped)} files skipped" if split.skipped else ""),
    )

    backbone = create_backbone(config.model, config.weights)
    native = Preprocessing.from_model(backbone).input_size
    size = config.image_size or choose_image_size(native, split.median_side)
    pre = Preprocessing.from_model(backbone, size)
    source = config.weights or ("shipped ImageNet" if config.model in EMBEDDED_WEIGHTS else "timm")
    why = "" if config.image_size else f" (native {native}, images ~{split.median_side} px)"
    _say(verbose, f"model     {config.model}, {source} weights, {size} px input{why}")

    model = create_classifier(backbone, len(split.classes), head)
    _check_head(model, len(split.classes))
    device = _device(config.device)
    model.to(device)
    config = dataclasses.replace(
        config,
        lr=config.lr or _DEFAULT_LR[config.optimizer],
        image_size=size,
        num_workers=_num_workers(config.num_workers),
        device=str(device),
    )
    groups = strategy.param_groups(model, config, config.lr)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    total = sum(p.numel() for p in model.parameters())
    _say(
        verbose,
        f"strategy  {strategy.name}: {strategy.summary}; {trainable:,} of {total:,} "
        f"parameters train, on {device}",
    )

    train_loader, val_loader = _loaders(split, pre, config, device)
    optimizer = _optimizer(groups, config)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, config.epochs * len(train_loader))
    )
    run_dir = _run_dir(config, split.root)
    config = dataclasses.replace(config, out=str(run_dir))
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (run_dir / "classes.json").write_text(json.dumps(list(split.classes), indent=2) + "\n")
    describe = {
        "model": {
            "name": config.model,
            "num_features": model.num_features,
            "head": "linear" if head is None else f"custom:{type(head).__qualname__}",
        },
        "classes": list(split.classes),
        "preprocessing": pre.to_dict(),
        "config": config.to_dict(),
        "strategy": strategy.name,
    }

    history = train(
        model,
        optimizer,
        scheduler,
        train_loader,
        val_loader,
        epochs=config.epochs,
        device=device,
        run_dir=run_dir,
        describe=describe,
        progress=verbose,
        on_epoch=lambda r: _say(verbose, _epoch_line(r, config.epochs)),
    )
    return FitResult(
        dir=run_dir,
        classes=split.classes,
        strategy=strategy.name,
        config=config,
        history=tuple(history),
        seconds=time.perf_counter() - started,
        skipped=split.skipped,
    )


def _check_head(model: nn.Module, num_classes: int) -> None:
    probe = torch.zeros(2, model.num_features)
    was_training = model.head.training
    model.head.eval()  # a probe must not move a BatchNorm head's running statistics
    try:
        with torch.no_grad():
            out = model.head(probe)
    except Exception as exc:  # whatever the user's module raises, say it is the head
        raise ConfigError(
            f"The custom head fails on features of shape (N, {model.num_features}): {exc}"
        ) from exc
    finally:
        model.head.train(was_training)
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(
            f"The custom head maps (2, {model.num_features}) to {tuple(out.shape)}; it must give "
            f"(N, {num_classes}), one logit per class."
        )


def _epoch_line(r: EpochResult, epochs: int) -> str:
    return (
        f"epoch {r.epoch:>{len(str(epochs))}}/{epochs}  train loss {r.train_loss:.3f} "
        f"acc {r.train_acc:.3f}  val loss {r.val_loss:.3f} acc {r.val_acc:.3f}  "
        f"lr {r.lr:.2e}  {r.seconds:.1f}s" + ("  *" if r.best else "")
    )
