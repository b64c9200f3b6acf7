"""``finetune.fit`` and ``finetune.plan``: folder -> dataset -> model -> strategy -> trainer.

Read ``fit`` top to bottom to follow a run; each step is one call into its own module.
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

from finetune.config import DEFAULT_EPOCHS, FitConfig
from finetune.data import DatasetSplit, scan_folder
from finetune.errors import ConfigError
from finetune.measure import Decision, pass_seconds, training_epoch_seconds
from finetune.models import EMBEDDED_WEIGHTS, create_backbone, create_classifier
from finetune.strategies import FitContext, Strategy, get_strategy
from finetune.train import EpochResult
from finetune.transforms import Preprocessing, choose_image_size

__all__ = ["FitResult", "Plan", "fit", "plan"]

_DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-2}


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` produced."""

    dir: Path  # the run directory
    classes: tuple[str, ...]
    strategy: str  # the strategy that ran (auto's choice when auto was asked for)
    config: FitConfig  # the values actually used (image size, lr, device... resolved)
    history: tuple[EpochResult, ...]
    seconds: float
    skipped: tuple[tuple[Path, str], ...]  # files that were not usable images, and why
    decision: Decision | None  # auto's measurements and reasons, when auto chose

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


@dataclass(frozen=True)
class Plan:
    """What ``fit`` would do, without training (``finetune plan``)."""

    data: DatasetSplit
    strategy: str
    config: FitConfig  # resolved as fit would resolve it
    decision: Decision | None  # auto's measurements and reasons
    estimate_seconds: float  # expected training time on this machine
    trains_backbone: bool  # False for the probes: one feature pass, no epochs

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``finetune plan --json``)."""
        return {
            "data": {
                "root": str(self.data.root),
                "layout": self.data.layout,
                "classes": list(self.data.classes),
                "train_images": len(self.data.train),
                "val_images": len(self.data.val),
            },
            "strategy": self.strategy,
            "config": self.config.to_dict(),
            "decision": self.decision.to_dict() if self.decision is not None else None,
            "estimate_seconds": self.estimate_seconds,
        }


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


def _resolve(
    data: str | Path, config: FitConfig, verbose: bool
) -> tuple[DatasetSplit, nn.Module, Strategy, FitConfig, Decision | None, torch.device]:
    """Steps shared by fit and plan: scan, backbone, strategy (auto decides), settings."""
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
    device = _device(config.device)
    backbone.to(device)
    strategy, config, decision = strategy.resolve(split, backbone, config, device)
    if decision is not None:
        _say(verbose, f"auto      {decision.cell} -> {decision.strategy}")
        for reason in decision.reasons:
            _say(verbose, f"          - {reason}")
    native = Preprocessing.from_model(backbone).input_size
    config = dataclasses.replace(
        config,
        strategy=strategy.name,
        lr=config.lr or _DEFAULT_LR[config.optimizer],
        epochs=(config.epochs or DEFAULT_EPOCHS) if strategy.trains_backbone else 1,
        image_size=config.image_size or choose_image_size(native, split.median_side),
        num_workers=_num_workers(config.num_workers),
        device=str(device),
    )
    if decision is not None:
        decision = dataclasses.replace(decision, hyperparameters=_hyperparameters(config, strategy))
    source = config.weights or ("shipped ImageNet" if config.model in EMBEDDED_WEIGHTS else "timm")
    why = f" (native {native}, images ~{split.median_side} px)" if decision is None else ""
    _say(verbose, f"model     {config.model}, {source} weights, {config.image_size} px input{why}")
    return split, backbone, strategy, config, decision, device


def _hyperparameters(config: FitConfig, strategy: Strategy) -> dict[str, Any]:
    """The settings that matter for ``strategy``, as ``decision.json`` records them."""
    chosen: dict[str, Any] = {"image_size": config.image_size, "batch_size": config.batch_size}
    if not strategy.trains_backbone:
        return {**chosen, "head": "logistic regression, C by 3-fold cross-validation"}
    return {
        **chosen,
        "epochs": config.epochs,
        "optimizer": config.optimizer,
        "head_lr": config.lr,
        "top_backbone_lr": config.lr * config.backbone_lr_scale,
        "layer_decay": config.layer_decay,
        "unfreeze": config.unfreeze if strategy.name == "finetune-top" else "all",
        "warmup_epochs": config.warmup_epochs,
        "weight_decay": config.weight_decay,
    }


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
            It trains with the fine-tuning strategies; probes fit a linear head of their own.
        verbose: Print what was decided and one line per epoch to stderr, with progress bars.
        **options: Fields of :class:`FitConfig`, e.g. ``strategy="finetune-all", epochs=3``.

    Returns:
        A :class:`FitResult`; the run directory holds best.pt, last.pt, metrics.csv,
        config.json, classes.json (and decision.json when auto chose).

    Example:
        >>> run = finetune.fit("sample_data/fashion", strategy="linear")
        >>> print(run.best_metric, run.dir)
    """
    started = time.perf_counter()
    config = FitConfig.from_kwargs(config, **options)
    if head is not None and config.strategy in ("linear", "stage-probe"):
        raise ConfigError(
            f"--strategy {config.strategy} fits its own linear head; a custom head needs "
            "finetune-top or finetune-all."
        )
    split, backbone, strategy, config, decision, device = _resolve(data, config, verbose)
    if head is not None and not strategy.trains_backbone:
        raise ConfigError(
            f"auto chose {strategy.name}, which fits its own linear head; pass "
            "strategy='finetune-top' or 'finetune-all' to train a custom head."
        )
    pre = Preprocessing.from_model(backbone, config.image_size)
    model = create_classifier(backbone, len(split.classes), head)
    _check_head(model, len(split.classes))
    model.to(device)

    run_dir = _run_dir(config, split.root)
    config = dataclasses.replace(config, out=str(run_dir))
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (run_dir / "classes.json").write_text(json.dumps(list(split.classes), indent=2) + "\n")
    if decision is not None:
        (run_dir / "decision.json").write_text(json.dumps(decision.to_dict(), indent=2) + "\n")
    describe = {
        "model": {
            "name": config.model,
            "num_features": model.num_features,
            "head": "linear" if head is None else f"custom:{type(head).__qualname__}",
            "stage": None,
        },
        "classes": list(split.classes),
        "preprocessing": pre.to_dict(),
        "config": config.to_dict(),
        "strategy": strategy.name,
        "decision": decision.to_dict() if decision is not None else None,
    }
    ctx = FitContext(
        model=model,
        split=split,
        pre=pre,
        config=config,
        device=device,
        run_dir=run_dir,
        describe=describe,
        verbose=verbose,
        say=lambda message: _say(verbose, message),
        on_epoch=lambda r: _say(verbose, _epoch_line(r, config.epochs)),
    )
    model, history = strategy.fit(ctx)
    return FitResult(
        dir=run_dir,
        classes=split.classes,
        strategy=strategy.name,
        config=config,
        history=tuple(history),
        seconds=time.perf_counter() - started,
        skipped=split.skipped,
        decision=decision,
    )


def plan(
    data: str | Path, config: FitConfig | None = None, *, verbose: bool = False, **options: Any
) -> Plan:
    """Measure ``data`` and decide as ``fit`` would, without training.

    Returns:
        A :class:`Plan` with auto's measurements and reasons (if auto) and the expected
        training time on this machine.
    """
    config = FitConfig.from_kwargs(config, **options)
    split, backbone, strategy, config, decision, device = _resolve(data, config, verbose)
    if decision is not None:
        seconds = decision.estimate_seconds
    else:
        model = create_classifier(backbone, len(split.classes))
        n_train, n_val, side = len(split.train), len(split.val), config.image_size
        if strategy.trains_backbone:
            epoch = training_epoch_seconds(model, side, device, n_train, n_val)
            seconds = config.epochs * epoch
        else:  # probes: one feature pass
            seconds = pass_seconds(model, side, device, n_train + n_val)
    return Plan(split, strategy.name, config, decision, seconds, strategy.trains_backbone)


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
        + (f"lr {r.lr:.2e}  " if r.lr > 0 else "")
        + f"{r.seconds:.1f}s"
        + ("  *" if r.best else "")
    )
