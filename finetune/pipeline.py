"""``finetune.fit`` and ``finetune.plan``: folder -> dataset -> model -> strategy -> trainer.

Read ``fit`` top to bottom to follow a run; each step is one call into its own module.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune.config import (
    CACHE_IMAGES_UP_TO,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    IMBALANCED_FROM,
    FitConfig,
)
from finetune.data.decoded import describe_size, estimate_bytes
from finetune.data.scan import DatasetSplit, Sample, ScanReport, scan_folder
from finetune.data.transforms import (
    Augmentation,
    DeviceNormalize,
    Lighting,
    Preprocessing,
    augmentation_of,
    choose_image_size,
    fit_lighting,
    preset_for,
    resize_side,
)
from finetune.errors import CheckpointError, ConfigError, DataError, FinetuneError
from finetune.files import atomic_write
from finetune.inference.tta import TTAChoice
from finetune.log import _Log, _on_epoch
from finetune.model.backbone import EMBEDDED_WEIGHTS, create_backbone, create_classifier
from finetune.run.checkpoint import CheckpointMeta, ModelSpec, add_to_checkpoint, load_checkpoint
from finetune.run.layout import RunDir
from finetune.strategies import FitContext, Strategy, get_strategy
from finetune.strategies.auto import Comparison, compare, fit_baseline
from finetune.strategies.loaders import training_loaders
from finetune.strategies.measure import (
    SCORING_SHARE,
    TRAINING_SHARE,
    DataSize,
    Decision,
    measure_size,
    pass_seconds,
    training_epoch_seconds,
)
from finetune.training.compute import (
    MAX_AUTO_BATCH,
    autocast_dtype,
    check_compile,
    cuda_step_fits,
    grad_scaler,
    keep_freed_memory,
    largest_batch,
    resolve_channels_last,
    resolve_precision,
)
from finetune.training.distributed import World, world
from finetune.training.loop import (
    EpochResult,
    TrainStep,
    balanced_class_weights,
    names_memory_options,
    read_metrics,
)
from finetune.training.lr_range import (
    LRFinding,
    check_range,
    find_lr,
    output_paths,
    plot_lr_finding,
)
from finetune.training.optim import create_optimizer

__all__ = ["FitResult", "Plan", "check", "fit", "lr_find", "plan", "resume"]


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
    tta_val_acc: float | None = None  # val accuracy of best.pt with the TTA mode chosen
    tta: TTAChoice | None = None  # none/flip/10crop scored on val, and the mode chosen
    report: Path | None = None  # report.html in the run directory (None: it could not be made)

    @property
    def run(self) -> RunDir:
        """The run directory's files by name (:class:`~finetune.run.layout.RunDir`)."""
        return RunDir(self.dir)

    @property
    def best(self) -> EpochResult:
        """The epoch whose weights are in ``best.pt``."""
        return [r for r in self.history if r.best][-1]

    @property
    def comparison(self) -> Comparison | None:
        """auto's probe baseline against its fine-tune, and which ``best.pt`` holds (None: no
        baseline ran)."""
        kept = self.decision.kept if self.decision is not None else None
        return Comparison(**kept) if kept else None

    @property
    def best_metric(self) -> float:
        """Validation accuracy of ``best.pt`` (auto's probe baseline, when it was kept)."""
        comparison = self.comparison
        if comparison is not None and comparison.kept == "probe":
            return comparison.probe_val_acc
        return self.best.val_acc

    @property
    def best_ema(self) -> EpochResult | None:
        """The epoch whose moving-average weights are in ``ema.pt`` (None: no EMA)."""
        best = [r for r in self.history if r.ema_best]
        return best[-1] if best else None

    @property
    def snapshots(self) -> tuple[Path, ...]:
        """The snapshot checkpoints (one per LR cycle of ``schedule="restarts"``)."""
        return tuple(self.run.snapshots())

    @property
    def best_checkpoint(self) -> Path:
        return self.run.best

    @property
    def last_checkpoint(self) -> Path:
        return self.run.last


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
    """The new run's folder, claimed (its lock held: :meth:`RunDir.unlock` it at the end)."""
    return RunDir.create(config.out, f"{root.resolve().name}-{config.strategy}").path


def _check_out(data: str | Path, out: str | None) -> None:
    """Refuse an ``--out`` fit may not write into (a file, a folder holding files, a run:
    :meth:`RunDir.check_new`), and warn when the run folder lands inside the data folder,
    where the next scan of that folder would find it."""
    folder = Path(out if out is not None else "runs").expanduser().absolute()
    root = Path(data).expanduser().absolute()
    if root.is_dir() and (folder == root or root in folder.parents):
        where = "--out" if out is not None else "the default run folder runs/"
        warnings.warn(
            f"{where} {folder} is inside the data folder {root}; give an --out outside it so "
            "the run's files stay apart from the images.",
            stacklevel=3,
        )
    if out is not None:
        RunDir(out).check_new()


def _resolve(
    data: str | Path, config: FitConfig, log: _Log
) -> tuple[DatasetSplit, nn.Module, Strategy, FitConfig, Decision | None, torch.device]:
    """Steps shared by fit and plan: scan, backbone, strategy (auto decides), settings."""
    strategy = get_strategy(config.strategy)
    _seed_everything(config.seed)
    split = scan_folder(data, val_split=config.val_split, seed=config.seed, progress=log.bars)
    log.text(
        f"data      {split.root}: {len(split.classes)} classes, {len(split.train)} train / "
        f"{len(split.val)} val images ({split.layout})"
    )
    report = split.report
    log.event(
        "data", root=str(split.root), layout=split.layout, classes=list(split.classes),
        train=split.counts("train"), val=split.counts("val"), check=report.summary(),
        skipped=len(report.skipped),
    )  # fmt: skip
    if report.skipped or report.notes or report.leaks or report.imbalance >= IMBALANCED_FROM:
        if log.verbose:
            log.text(f"check     {report.summary()} (finetune check {split.root})")
        else:
            warnings.warn(f"{split.root}: {report.summary()}", stacklevel=3)
    backbone = create_backbone(config.model, config.weights, drop_path_rate=config.drop_path)
    device = _device(config.device)
    if device.type == "cpu":  # before auto times training steps: they run faster with it
        keep_freed_memory()
    backbone.to(device)
    # The layout first: auto times training steps in it.
    config = dataclasses.replace(
        config, channels_last=resolve_channels_last(config.channels_last, device)
    )
    strategy, config, decision = strategy.resolve(split, backbone, config, device)
    if decision is not None:
        log.text(f"auto      {decision.cell} -> {decision.strategy}")
        for reason in decision.reasons:
            log.text(f"          - {reason}")
    native = Preprocessing.from_model(backbone).input_size
    preset, _ = preset_for(measure_size(split).per_class_median)
    balance = config.balance
    if balance is None:
        balance = "weighted-loss" if split.report.imbalance >= IMBALANCED_FROM else "none"
        if balance != "none":
            log.say(
                f"balance   weighted-loss: the largest class has {split.report.imbalance:.1f}x "
                f"the images of the smallest (>= {IMBALANCED_FROM:g}x); --balance to change"
            )
    config = dataclasses.replace(
        config,
        strategy=strategy.name,
        augment=config.augment or preset,
        balance=balance,
        lr=config.lr or DEFAULT_LR[config.optimizer],
        epochs=(config.epochs or DEFAULT_EPOCHS) if strategy.trains_backbone else 1,
        image_size=config.image_size or choose_image_size(native, split.median_side),
        num_workers=_num_workers(config.num_workers),
        device=str(device),
        precision=resolve_precision(config.precision, device),
    )
    if config.compile:
        check_compile()
    if decision is not None:
        decision = dataclasses.replace(decision, hyperparameters=_hyperparameters(config, strategy))
    source = config.weights or ("shipped ImageNet" if config.model in EMBEDDED_WEIGHTS else "timm")
    why = f" (native {native}, images ~{split.median_side} px)" if decision is None else ""
    log.text(f"model     {config.model}, {source} weights, {config.image_size} px input{why}")
    log.event(
        "decision", strategy=strategy.name, model=config.model, weights=source,
        image_size=config.image_size, epochs=config.epochs, device=config.device,
        auto=decision.to_dict() if decision is not None else None,
    )  # fmt: skip
    return split, backbone, strategy, config, decision, device


def _hyperparameters(config: FitConfig, strategy: Strategy) -> dict[str, Any]:
    """The settings that matter for ``strategy``, as ``decision.json`` records them."""
    chosen: dict[str, Any] = {
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "balance": config.balance,
    }
    if not strategy.trains_backbone:
        return {**chosen, "head": "logistic regression, C by 3-fold cross-validation"}
    return {
        **chosen,
        "augment": augmentation_of(config).to_dict(),
        "epochs": config.epochs,
        "optimizer": config.optimizer,
        "head_lr": config.lr,
        "top_backbone_lr": config.lr * config.backbone_lr_scale,
        "layer_decay": config.layer_decay,
        "unfreeze": config.unfreeze if strategy.name == "finetune-top" else "all",
        "warmup_epochs": config.warmup_epochs,
        "weight_decay": config.weight_decay,
        "schedule": config.schedule,
        "ema": config.ema,
    }


@names_memory_options
def fit(
    data: str | Path,
    config: FitConfig | None = None,
    *,
    head: nn.Module | None = None,
    verbose: bool = True,
    log_format: str = "text",
    report: bool = True,
    **options: Any,
) -> FitResult:
    """Train a classifier on a folder of labelled images.

    Args:
        data: A folder with one sub-folder per class (or ``train/`` and ``val/`` trees).
        config: Base configuration; ``options`` override its fields (see :class:`FitConfig`).
        head: A custom head: any ``nn.Module`` mapping (N, num_features) to (N, num_classes).
            It trains with the fine-tuning strategies; probes fit a linear head of their own.
        verbose: Print what was decided and one line per epoch to stderr, with progress bars.
        log_format: "text" (lines for people) or "json" (one JSON object per line on stderr,
            no progress bars: events "data", "decision", "epoch", "summary" and "message").
        report: Write ``report.html`` into the run directory at the end (see
            :func:`finetune.report`).
        **options: Fields of :class:`FitConfig`, e.g. ``strategy="finetune-all", epochs=3``.

    Returns:
        A :class:`FitResult`; the run directory holds best.pt, last.pt, metrics.csv,
        config.json, classes.json, report.html (and decision.json when auto chose).

    Example:
        >>> run = finetune.fit("sample_data/fashion", strategy="linear")
        >>> print(run.best_metric, run.dir)
    """
    started = time.perf_counter()
    log = _Log(verbose, log_format)
    config = FitConfig.from_kwargs(config, **options)
    preset_by_size = config.augment is None
    if head is not None and config.strategy in ("linear", "stage-probe"):
        raise ConfigError(
            f"--strategy {config.strategy} fits its own linear head; a custom head needs "
            "finetune-top or finetune-all."
        )
    ranks = world(config.device)  # torchrun: rank 0 decides, prints and writes
    log = _Log(log.verbose and ranks.main, log.format)
    if ranks.main:  # a folder fit may not write into is refused before minutes are spent
        _check_out(data, config.out)
    if ranks.main:
        split, backbone, strategy, config, decision, device = _resolve(data, config, log)
        ranks.share(config)
    else:  # the config rank 0 resolved (auto's choice included), on this rank's device
        resolved = ranks.share(None)
        resolved = dataclasses.replace(resolved, device=ranks.device(config.device))
        with warnings.catch_warnings():  # rank 0 reported the data already
            warnings.simplefilter("ignore")
            split, backbone, strategy, config, decision, device = _resolve(
                data, resolved, _Log(False)
            )
    if head is not None and not strategy.trains_backbone:
        raise ConfigError(
            f"auto chose {strategy.name}, which fits its own linear head; pass "
            "strategy='finetune-top' or 'finetune-all' to train a custom head."
        )
    pre = Preprocessing.from_model(backbone, config.image_size)
    if strategy.trains_backbone and config.cache_images is None:
        config = _cache_images(config, split, pre, log)
    dropout = config.dropout if strategy.trains_backbone else 0.0
    model = create_classifier(backbone, len(split.classes), head, dropout)
    _check_head(model, len(split.classes))
    model.to(device)
    augmentation, lighting, run_dir = augmentation_of(config), None, None
    if ranks.main:
        if config.auto_batch_size:
            config = _auto_batch_size(model, config, strategy, len(split.train), ranks, log)
        if strategy.trains_backbone:
            lighting = _lighting(augmentation, split, config, log, preset_by_size)
        run_dir = _run_dir(config, split.root)  # claimed: run.lock held until the run ends
    try:
        if run_dir is not None:
            _write_run_files(
                run_dir, dataclasses.replace(config, out=str(run_dir)), split, decision
            )
        lighting, run_dir, batch_size = ranks.share((lighting, run_dir, config.batch_size))
        config = dataclasses.replace(config, out=str(run_dir), batch_size=batch_size)
        if not (ranks.main or strategy.trains_backbone):  # a probe is one pass: rank 0's alone
            return ranks.finish(None)  # leaves the process group in order
        meta = CheckpointMeta(
            model=ModelSpec(
                name=config.model,
                num_features=model.num_features,
                head="linear" if head is None else f"custom:{type(head).__qualname__}",
            ),
            data=str(split.root.resolve()),
            classes=split.classes,
            preprocessing=pre,
            config=config.to_dict(),
            strategy=strategy.name,
            decision=decision.to_dict() if decision is not None else None,
            augmentation={
                **augmentation.to_dict(),
                "pca_lighting": lighting.to_dict() if lighting else None,
            }
            if strategy.trains_backbone
            else None,
        )
        ctx = FitContext(
            model=model,
            split=split,
            pre=pre,
            config=config,
            device=device,
            run_dir=run_dir,
            meta=meta,
            verbose=log.bars,
            say=log.say,
            on_epoch=_on_epoch(log, config.epochs),
            augmentation=augmentation,
            lighting=lighting,
            ranks=ranks,
            deadline=_deadline(config, decision, started),
        )
        return ranks.finish(_train(ctx, strategy, decision, started, log, report, head))
    finally:  # success, error or Ctrl-C: the next fit or resume may have the folder
        if run_dir is not None:
            RunDir(run_dir).unlock()


def _cache_images(
    config: FitConfig, split: DatasetSplit, pre: Preprocessing, log: _Log
) -> FitConfig:
    """Resolve ``cache_images=None``: cache the decoded images when decoding them costs
    something (they are larger than the resize side) and the arrays fit the size limit.

    Small images decode faster than a cached array is read, camera photos far slower
    (``benchmarks/throughput.py`` prints both; docs/speed.md has the numbers), so the cache pays
    only for images larger than the resize side.
    """
    side = resize_side(pre)
    if split.median_side <= side:
        log.say(
            f"cache     off: the images are already small (median side {split.median_side} px, "
            f"not above {side}), so decoding them is cheaper than reading a cache"
        )
        return dataclasses.replace(config, cache_images=False)
    need = estimate_bytes([*split.train, *split.val], side)
    if need > CACHE_IMAGES_UP_TO:
        log.say(
            f"cache     off: the decoded images would take {describe_size(need)}, over "
            f"{describe_size(CACHE_IMAGES_UP_TO)}; --cache-images turns it on anyway"
        )
    return dataclasses.replace(config, cache_images=need <= CACHE_IMAGES_UP_TO)


def _auto_batch_size(
    model: nn.Module,
    config: FitConfig,
    strategy: Strategy,
    train_images: int,
    ranks: World,
    log: _Log,
) -> FitConfig:
    """``config`` with the largest batch whose training step fits in the GPU's memory (each
    process's share of it, when distributed), doubling from ``batch_size`` up to the number of
    training images or :data:`~finetune.training.compute.MAX_AUTO_BATCH`; said, and unchanged, where
    memory does not limit the batch."""
    device = torch.device(config.device)
    if not strategy.trains_backbone:
        log.say(
            f"batch     auto batch size: {strategy.name} computes features once and fits a "
            f"logistic regression, which no batch size limits; keeping {config.batch_size}"
        )
        return config
    if device.type != "cuda":
        log.say(
            f"batch     auto batch size: on {device.type.upper()} memory does not limit the "
            f"batch; keeping {config.batch_size}"
        )
        return config
    fits = cuda_step_fits(
        model, config.image_size, device, amp=autocast_dtype(config.precision),
        channels_last=bool(config.channels_last),
    )  # fmt: skip
    limit = min(train_images, MAX_AUTO_BATCH)
    per_rank = largest_batch(fits, config.batch_size // ranks.size, limit // ranks.size)
    if per_rank == 0:
        raise ConfigError(
            f"Not even one {config.image_size} px image per step fits in the memory of "
            f"{device}; use a smaller --image-size or --model."
        )
    batch = per_rank * ranks.size
    gib = torch.cuda.get_device_properties(device).total_memory / 1024**3
    how = (
        f"doubling from {config.batch_size}, at most {limit}"
        if batch >= config.batch_size
        else f"{config.batch_size} does not fit, so halved"
    )
    log.say(
        f"batch     {batch}: auto batch size, the largest that fits in {gib:.0f} GiB of "
        f"{device} at {config.image_size} px, {config.precision} ({how}); the learning rate "
        "is not scaled"
    )
    return dataclasses.replace(config, batch_size=batch)


def _lighting(
    augmentation: Augmentation,
    split: DatasetSplit,
    config: FitConfig,
    log: _Log,
    preset_by_size: bool,
) -> Lighting | None:
    """Say which augmentation trains and why; the PCA of the training images' colours when
    the augmentation includes PCA lighting."""
    lighting = None
    if augmentation.lighting:
        lighting = fit_lighting([s.path for s in split.train], seed=config.seed)
    log.say(f"augment   {augmentation.describe()}")
    if preset_by_size:
        why = preset_for(measure_size(split).per_class_median)[1]
        log.say(f"          - preset from the data size: {why}; the less, the stronger")
    if lighting is not None:
        log.say(f"          - PCA lighting along the colour components of the {lighting.source}")
    return lighting


def _write_run_files(
    run_dir: Path, config: FitConfig, split: DatasetSplit, decision: Decision | None
) -> None:
    """config.json, classes.json, scan.json and (when auto chose) decision.json."""
    run = RunDir(run_dir)
    atomic_write(run.config, _json(config.to_dict()))
    atomic_write(run.classes, _json(list(split.classes)))
    atomic_write(run.scan, _json(split.report.to_dict()))
    atomic_write(run.split, _json(_split_record(split)))
    if decision is not None:
        atomic_write(run.decision, _json(decision.to_dict()))


_SPLIT_FORMAT = 1
_SPLIT_COLUMNS = ["path", "label", "sha1"]  # path relative to the data folder, POSIX slashes


def _split_record(split: DatasetSplit) -> dict[str, Any]:
    """split.json: the files of each side in their order, with the SHA-1 the scan computed
    (the content it read anyway), so ``resume`` trains and validates on these files and no
    other, whatever was added to the folder since."""

    def rows(samples: tuple[Sample, ...]) -> list[list[Any]]:
        return [[s.path.relative_to(split.root).as_posix(), s.label, s.digest] for s in samples]

    return {
        "format": _SPLIT_FORMAT,
        "root": str(split.root),
        "layout": split.layout,
        "classes": list(split.classes),
        "columns": _SPLIT_COLUMNS,
        "train": rows(split.train),
        "val": rows(split.val),
    }


def _recorded_split(run: RunDir, scanned: DatasetSplit) -> DatasetSplit:
    """The split the run started with, as its split.json recorded it, over the files the scan
    finds now; what changed since is said in a warning. Files added since are left out (a
    training image never becomes a validation image), recorded files that are gone or now
    unreadable are dropped, and a file whose content changed keeps its side. Runs written
    before split.json existed get the seeded split drawn again, as they always did.

    Raises:
        CheckpointError: split.json is damaged.
        DataError: A side would be left without images.
    """
    if not run.split.is_file():
        return scanned
    try:
        record = json.loads(run.split.read_text())
        sides = {side: [(str(r), int(lab), str(h)) for r, lab, h in record[side]]
                 for side in ("train", "val")}  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{run.split} cannot be read ({exc}); it records which images trained and which "
            "validated. Start the run again with finetune fit (or restore the file)."
        ) from exc
    found = {s.path.relative_to(scanned.root).as_posix(): s for s in (*scanned.train, *scanned.val)}
    missing: list[str] = []
    changed: list[str] = []
    kept: dict[str, list[Sample]] = {}
    for side, rows in sides.items():
        kept[side] = []
        for rel, label, digest in rows:
            sample = found.get(rel)
            if sample is None or sample.label != label:
                missing.append(rel)
                continue
            if digest and sample.digest and sample.digest != digest:
                changed.append(rel)
            kept[side].append(sample)
    recorded = {rel for rows in sides.values() for rel, _, _ in rows}
    added = sorted(set(found) - recorded)
    where = scanned.root
    for files, what in (
        (added, "added since the run started, left out: the run keeps its split"),
        (missing, "of the run's split are gone or unreadable, dropped"),
        (changed, "changed content since the run started; each keeps its side"),
    ):
        if files:
            warnings.warn(f"{where}: {_listed(files)} {what}.", stacklevel=3)
    for side in ("train", "val"):
        if not kept[side]:
            raise DataError(
                f"{where}: none of the run's {side} images is left; resume needs them. "
                "Restore them, or start a new run with finetune fit."
            )
    return dataclasses.replace(scanned, train=tuple(kept["train"]), val=tuple(kept["val"]))


def _listed(files: list[str], shown: int = 5) -> str:
    more = f" and {len(files) - shown} more" if len(files) > shown else ""
    noun = "file" if len(files) == 1 else "files"
    return f"{len(files)} {noun} ({', '.join(files[:shown])}{more})"


def _json(data: Any) -> str:
    """How a run's JSON records are written: indented for people, newline-terminated."""
    return json.dumps(data, indent=2) + "\n"


def _train(
    ctx: FitContext,
    strategy: Strategy,
    decision: Decision | None,
    started: float,
    log: _Log,
    report: bool,
    head: nn.Module | None,
) -> FitResult:
    """Run the strategy, then the optional TTA scoring and the report (best.pt loaded with
    ``head``, the custom head if any); the :class:`FitResult`."""
    baseline = _baseline(ctx, strategy, decision, head, log)
    history = strategy.fit(ctx)  # ctx.model is the trained model; the checkpoints hold it
    if ctx.resumed is not None:  # the epochs before the resume, as metrics.csv holds them
        history = read_metrics(RunDir(ctx.run_dir).metrics)
    if baseline is not None and decision is not None:
        decision = _keep_better(ctx, strategy, decision, baseline, history, log)
    config, run_dir = ctx.config, ctx.run_dir
    tta = None
    if config.tta != "none" and ctx.ranks.main:
        budget = _budget_seconds(config, decision)
        end = None if budget is None else started + budget * SCORING_SHARE
        tta = _choose_tta(run_dir, ctx.split, config, log, head, end)
    page = _write_report(ctx, head, log) if report and ctx.ranks.main else None
    result = FitResult(
        dir=run_dir,
        classes=ctx.split.classes,
        strategy=strategy.name,
        config=config,
        history=tuple(history),
        seconds=time.perf_counter() - started,
        skipped=ctx.split.skipped,
        decision=decision,
        tta_val_acc=None if tta is None else tta.accuracy.get(tta.chosen),
        tta=tta,
        report=page,
    )
    best = result.best
    log.event(
        "summary", run=str(run_dir), strategy=result.strategy,
        cell=decision.cell if decision is not None else None, best_epoch=best.epoch,
        epochs=len(result.history), val_acc=best.val_acc, val_loss=best.val_loss,
        train_acc=best.train_acc, tta_val_acc=result.tta_val_acc,
        tta=tta.to_dict() if tta is not None else None, seconds=result.seconds,
        kept=decision.kept if decision is not None else None, best_metric=result.best_metric,
        checkpoints=[str(p) for p in sorted(RunDir(run_dir).checkpoints())],
        report=str(page) if page else None,
    )  # fmt: skip
    return result


def _budget_seconds(config: FitConfig, decision: Decision | None) -> float | None:
    """The run's time budget: ``--time-budget``, else the CPU budget auto sized its fine-tune
    to (None: no budget)."""
    if config.time_budget is not None:
        return 60 * config.time_budget
    return decision.budget_seconds if decision is not None else None


def _deadline(config: FitConfig, decision: Decision | None, started: float) -> float | None:
    """When training must end (a ``time.perf_counter()`` value): by
    :data:`~finetune.strategies.measure.TRAINING_SHARE` of the budget from ``started``, the
    rest left for scoring TTA (by :data:`~finetune.strategies.measure.SCORING_SHARE`) and
    writing the report."""
    budget = _budget_seconds(config, decision)
    return None if budget is None else started + budget * TRAINING_SHARE


def _baseline(
    ctx: FitContext,
    strategy: Strategy,
    decision: Decision | None,
    head: nn.Module | None,
    log: _Log,
) -> tuple[str, EpochResult] | None:
    """auto's probe baseline for its fine-tune (:func:`~finetune.strategies.auto.fit_baseline`):
    fit now, or when resuming read back from the run's ``baseline/`` folder; None where there
    is none (not auto, a probe, a custom head, several processes, a run begun without one)."""
    if decision is None or decision.baseline is None or not strategy.trains_backbone:
        return None
    if head is not None:
        log.say("baseline  none: your custom head trains only in a fine-tune, so no probe to "
                "compare it with")  # fmt: skip
        return None
    if ctx.ranks.size > 1:  # the probe runs in one process; the others would wait for it
        log.say("baseline  none under torchrun: run auto in one process to compare with a probe")
        return None
    folder = ctx.run.baseline
    if ctx.resumed is not None:
        if not folder.best.is_file():
            return None
        state = load_checkpoint(folder.best)
        return str(state["strategy"]), EpochResult(**state["metrics"])
    started = time.perf_counter()
    log.say(f"baseline  the {decision.baseline} probe first, the fine-tune must beat it on val")
    name, result = fit_baseline(ctx, decision)
    log.say(
        f"baseline  {name}: val acc {result.val_acc:.3f}, val loss {result.val_loss:.3f} "
        f"({time.perf_counter() - started:.1f}s, in {folder.path})"
    )
    return name, result


def _keep_better(
    ctx: FitContext,
    strategy: Strategy,
    decision: Decision,
    baseline: tuple[str, EpochResult],
    history: list[EpochResult],
    log: _Log,
) -> Decision:
    """Keep the better of auto's probe baseline and its fine-tune in ``best.pt`` (the
    fine-tune's best epoch moves to ``finetune-best.pt`` when the probe wins); the decision
    with the comparison, written to decision.json."""
    comparison = compare(baseline[1], history, baseline[0], strategy.name)
    run = ctx.run
    if ctx.ranks.main:
        # best.pt holds the probe already when a run that kept it was continued (config.json's
        # epochs raised) and no epoch since beat the fine-tune's best, kept aside.
        holds_probe = load_checkpoint(run.best).get("strategy") == comparison.probe
        if comparison.kept == "probe" and not holds_probe:
            atomic_write(run.finetune_best, run.best.read_bytes())
            atomic_write(run.best, run.baseline.best.read_bytes())
        elif comparison.kept == "finetune" and holds_probe:
            atomic_write(run.best, run.finetune_best.read_bytes())
            run.finetune_best.unlink()  # fit's own copy, now in best.pt
    decision = dataclasses.replace(decision, kept=comparison.to_dict())
    if ctx.ranks.main:
        atomic_write(run.decision, _json(decision.to_dict()))
    log.say(f"kept      {comparison.describe()}")
    return decision


def _write_report(ctx: FitContext, head: nn.Module | None, log: _Log) -> Path | None:
    """report.html for a run that just ended (its split as scanned, not scanned again); a
    warning (not an error: the run is saved) when it cannot be made."""
    from finetune.reporting.html import report

    started = time.perf_counter()
    try:
        path = report(
            ctx.run_dir, head=head, device=ctx.config.device, progress=log.bars, split=ctx.split
        )
    except FinetuneError as exc:
        warnings.warn(f"{ctx.run_dir}: no report.html ({exc})", stacklevel=3)
        return None
    log.say(f"report    {path} ({time.perf_counter() - started:.1f}s)")
    return path


@names_memory_options
def resume(
    run_dir: str | Path,
    *,
    head: nn.Module | None = None,
    verbose: bool = True,
    log_format: str = "text",
    report: bool = True,
) -> FitResult:
    """Continue a fine-tune that stopped (killed, Ctrl-C, a crash) from its ``last.pt``.

    The run's own ``config.json`` and data folder are used; weights, optimizer, scheduler, RNG
    and epoch come from ``last.pt``, and every epoch reseeds shuffling and augmentation from
    (seed, epoch), so the result is the one an uninterrupted run would have given.

    Raises:
        CheckpointError: ``run_dir`` has no ``last.pt`` (nothing was saved to resume from).
        ConfigError: The run is complete, or was a probe (one pass, nothing to resume).
        DataError: The data folder is gone or its classes changed.
    """
    started = time.perf_counter()
    log = _Log(verbose, log_format)
    run = RunDir(run_dir)
    run_dir = run.path
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "--resume runs in one process for now; continue without torchrun: "
            f"finetune fit --resume {run_dir} (--batch-size is the global batch, so the run "
            "optimises the same way)."
        )
    if not run.last.is_file():
        raise CheckpointError(
            f"{run_dir} holds no last.pt: no epoch finished, so there is nothing to resume. "
            "Start the run again with finetune fit."
        )
    run.lock()  # one fit or resume at a time writes a run folder
    try:
        return _resume_locked(run, head, log, report, started)
    finally:  # success, error or Ctrl-C alike
        run.unlock()


def _run_config(run: RunDir) -> FitConfig:
    """The run's config.json, refused cleanly when it is not a JSON object of settings."""
    try:
        values = json.loads(run.config.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Cannot read {run.config}: {exc}; was it edited?") from exc
    if not isinstance(values, dict):
        raise CheckpointError(
            f"{run.config} holds a JSON {type(values).__name__}, not the run's settings (an "
            "object); was it edited? Start the run again with finetune fit."
        )
    return FitConfig.from_kwargs(**values)


def _resume_locked(
    run: RunDir, head: nn.Module | None, log: _Log, report: bool, started: float
) -> FitResult:
    """:func:`resume`, once the run folder's lock is held."""
    run_dir = run.path
    last = load_checkpoint(run.last)
    config = _run_config(run)
    saved_model = (last.get("model") or {}).get("name")
    if saved_model != config.model:
        raise CheckpointError(
            f"{run.last} holds a {saved_model} model but {run.config} says {config.model}: the "
            "checkpoint is another run's. Put that run's last.pt back, or start again with "
            "finetune fit."
        )
    strategy = get_strategy(config.strategy)
    if not strategy.trains_backbone:
        raise ConfigError(f"{run_dir} is a {strategy.name} run: one pass, nothing to resume.")
    if last["epoch"] >= config.epochs or last.get("stopped_early"):
        early = " (stopped early)" if last.get("stopped_early") else ""
        raise ConfigError(
            f"{run_dir} is complete ({last['epoch']}/{config.epochs} epochs{early}); "
            "nothing to resume."
        )
    _seed_everything(config.seed)
    split = scan_folder(last["data"], val_split=config.val_split, seed=config.seed)
    if list(split.classes) != list(last["classes"]):
        raise DataError(
            f"The classes in {split.root} changed since {run_dir} started "
            f"({', '.join(last['classes'])}); resume needs the same folder."
        )
    split = _recorded_split(run, split)
    log.say(f"resume    {run_dir}: epoch {last['epoch']}/{config.epochs} done, continuing")
    device = _device(config.device)
    # last.pt has the weights
    backbone = create_backbone(config.model, pretrained=False, drop_path_rate=config.drop_path)
    model = create_classifier(backbone, len(split.classes), head, config.dropout)
    try:
        model.load_state_dict(last["state_dict"])
    except RuntimeError as exc:  # torch lists the missing, unexpected and mis-shaped weights
        raise CheckpointError(
            f"{run.last} does not fit {config.model} with {len(split.classes)} classes (is it "
            f"another run's?): {str(exc).splitlines()[0]}"
        ) from exc
    model.to(device)
    saved = last.get("augmentation") or {}
    lighting = saved.get("pca_lighting")
    # The description goes on as it was; the strategy records the frozen layers again if it
    # computes them once again.
    meta = dataclasses.replace(CheckpointMeta.from_dict(last), frozen=None)
    decision = _decision(last["decision"]) if last.get("decision") else None  # as recorded
    ctx = FitContext(
        model=model,
        split=split,
        pre=meta.preprocessing,
        config=config,
        device=device,
        run_dir=run_dir,
        meta=meta,
        verbose=log.bars,
        say=log.say,
        on_epoch=_on_epoch(log, config.epochs),
        augmentation=augmentation_of(config),
        lighting=Lighting.from_dict(lighting) if lighting else None,
        resumed=last,
        deadline=_deadline(config, decision, started),  # the budget holds for this session
    )
    return _train(ctx, strategy, decision, started, log, report, head)


def _decision(data: dict[str, Any]) -> Decision:
    size = DataSize(**{k: v for k, v in data["size"].items() if k != "imbalance"})
    return Decision(**{**data, "size": size, "reasons": tuple(data["reasons"])})


def _choose_tta(
    run_dir: Path,
    split: DatasetSplit,
    config: FitConfig,
    log: _Log,
    head: nn.Module | None,
    deadline: float | None,
) -> TTAChoice:
    """Score none, flip and 10crop with ``best.pt`` on the val images
    (:mod:`finetune.inference.tta`), keep the choice (or the mode ``--tta`` fixed) in best.pt,
    where predict and evaluate find it, and write the scores to tta.json; images stop being
    scored at ``deadline`` (the time budget's end), the record saying how many were."""
    from tqdm.auto import tqdm

    from finetune.inference.predict import load
    from finetune.inference.tta import SCORE_IMAGES, score_tta

    run = RunDir(run_dir)
    # best.pt's weights go into a copy of the custom head: the caller's module stays as it is
    predictor = load(run_dir, head=copy.deepcopy(head), device=config.device)
    fixed = None if config.tta == "auto" else config.tta
    samples = [(s.path, s.label) for s in split.val]
    with tqdm(total=min(len(samples), SCORE_IMAGES), desc="tta (10 views)", unit="image",
              leave=False, disable=None if log.bars else True) as bar:  # fmt: skip
        choice = score_tta(
            predictor, samples, batch_size=config.batch_size, seed=config.seed, fixed=fixed,
            progress=lambda done: bar.update(done - bar.n), deadline=deadline,
        )  # fmt: skip
    add_to_checkpoint(run.best, tta=choice.to_dict())
    record = {  # tta and val_acc: the keys tta.json had before the modes were compared
        "tta": choice.chosen, "val_acc": choice.accuracy[choice.chosen],
        "val_images": choice.images, **choice.to_dict(),
    }  # fmt: skip
    atomic_write(run.tta, _json(record))
    log.say(f"tta       {choice.describe()}")
    why = None if fixed is None else choice.hurts(fixed)
    if why is not None:
        warnings.warn(f"{run_dir}: {why}.", stacklevel=4)
    return choice


def check(data: str | Path, val_split: float = 0.2, seed: int = 0) -> ScanReport:
    """Scan ``data`` as ``fit`` would, without training: every file checked by content, the
    bad ones listed with the reason, tiny images and symlinks noted, identical files in train
    and val or in two classes reported. Nothing in the folder is written.

    Raises:
        DataError: The folder cannot be used at all (missing, one class, a class too small).
    """
    return scan_folder(data, val_split=val_split, seed=seed, progress=True).report


@names_memory_options
def plan(
    data: str | Path, config: FitConfig | None = None, *, verbose: bool = False, **options: Any
) -> Plan:
    """Measure ``data`` and decide as ``fit`` would, without training.

    Returns:
        A :class:`Plan` with auto's measurements and reasons (if auto) and the expected
        training time on this machine.
    """
    config = FitConfig.from_kwargs(config, **options)
    split, backbone, strategy, config, decision, device = _resolve(data, config, _Log(verbose))
    if decision is not None:
        seconds = decision.estimate_seconds
    else:
        model = create_classifier(backbone, len(split.classes))
        n_train, n_val, side = len(split.train), len(split.val), config.image_size
        if strategy.trains_backbone:
            layout = bool(config.channels_last)
            epoch = training_epoch_seconds(model, side, device, n_train, n_val, layout)
            seconds = config.epochs * epoch
        else:  # probes: one feature pass
            seconds = pass_seconds(model, side, device, n_train + n_val, bool(config.channels_last))
    return Plan(split, strategy.name, config, decision, seconds, strategy.trains_backbone)


@names_memory_options
def lr_find(
    data: str | Path,
    config: FitConfig | None = None,
    *,
    out: str | Path = "lr-find.png",
    steps: int = 100,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    verbose: bool = True,
    **options: Any,
) -> LRFinding:
    """The learning-rate range test on ``data`` with the model, layer groups, optimizer,
    augmentation and training step ``fit`` would use (same options: precision, memory layout,
    class weights and label smoothing included); nothing is saved but the plot.

    Args:
        data: The image folder, as for :func:`fit`.
        config: Base configuration; ``options`` override its fields.
        out: The plot's path (a folder: ``lr-find.png`` in it); the numbers are written
            beside it, the same name with ``.json``, replacing only an earlier lr-find's.
        steps: Training steps (at least :data:`~finetune.training.lr_range.MIN_STEPS`).
        start_lr: The head LR of the first step.
        end_lr: The head LR of the last step, above ``start_lr``.
        verbose: Print what was decided, with a progress bar.
        **options: Fields of :class:`FitConfig`.

    Returns:
        An :class:`~finetune.training.lr_range.LRFinding`: the loss per LR, the suggested head LR
        (``.suggestion``) and the plot's path (``.plot``; ``lr-find.json`` is written beside).

    Raises:
        ConfigError: Too few ``steps``, a range that is not ``0 < start_lr < end_lr``, a
            strategy (or auto's choice) that is a probe, which has no LR to find, or a
            ``.json`` beside ``out`` that lr-find did not write.
        DataError: The folder has too few readable images.
        TrainingError: The loss diverged at once (``start_lr`` too large).
    """
    check_range(start_lr, end_lr, steps)  # before minutes are spent building the model
    plot_path, numbers = output_paths(out)  # a file lr-find would overwrite refused first
    config = FitConfig.from_kwargs(config, **options)
    split, backbone, strategy, config, _, device = _resolve(data, config, _Log(verbose))
    if not strategy.trains_backbone:
        raise ConfigError(
            f"{strategy.name} fits a logistic-regression head, which has no learning rate to "
            "find; pass --strategy finetune-top or finetune-all."
        )
    pre = Preprocessing.from_model(backbone, config.image_size)
    model = create_classifier(backbone, len(split.classes), dropout=config.dropout).to(device)
    loader = _lr_find_loader(split, pre, config, device)
    finding = find_lr(
        _lr_find_step(model, strategy, split, config, device, pre), loader,
        start_lr=start_lr, end_lr=end_lr, steps=steps, progress=verbose,
        reseed=loader.batch_sampler.set_epoch,  # each pass its own order and augmentation
    )  # fmt: skip
    title = f"{split.root.name}: {strategy.name}, {config.model}, {config.optimizer}"
    plot = plot_lr_finding(finding, plot_path, title)
    atomic_write(numbers, json.dumps(finding.to_dict(), indent=2) + "\n")
    return dataclasses.replace(finding, plot=plot)


def _lr_find_step(
    model: nn.Module,
    strategy: Strategy,
    split: DatasetSplit,
    config: FitConfig,
    device: torch.device,
    pre: Preprocessing,
) -> TrainStep:
    """The training step ``fit`` would run for ``strategy`` (finetune.strategies.finetune
    builds its :class:`~finetune.training.loop.Training` from the same settings), without the
    scheduler and the average, which a range test has no use for."""
    if config.channels_last:  # as fit converts it: the weights in the layout of the images
        model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(strategy.param_groups(model, config, config.lr), config)
    weights = None
    if config.balance == "weighted-loss":
        weights = balanced_class_weights([s.label for s in split.train], len(split.classes), device)
    return TrainStep(
        model, optimizer, device, amp=autocast_dtype(config.precision),
        scaler=grad_scaler(config.precision, device),
        channels_last=bool(config.channels_last), normalize=DeviceNormalize.of(pre),
        class_weights=weights, label_smoothing=config.label_smoothing,
    )  # fmt: skip


def _lr_find_loader(
    split: DatasetSplit, pre: Preprocessing, config: FitConfig, device: torch.device
) -> DataLoader:
    """The training loader ``fit`` would use: augmentation, PCA lighting, oversampling."""
    augmentation = augmentation_of(config)
    lighting = None
    if augmentation.lighting:
        lighting = fit_lighting([s.path for s in split.train], seed=config.seed)
    loader, _ = training_loaders(split, pre, config, device, augmentation, lighting)
    return loader


def _check_head(model: nn.Module, num_classes: int) -> None:
    probe = torch.zeros(2, model.num_features)
    was_training = model.head.training
    model.head.eval()  # a probe must not move a BatchNorm head's running statistics
    try:
        # no_grad, not inference_mode: a lazy head (nn.LazyLinear) creates its weights in this
        # call, and created under inference_mode they could never be trained.
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
