"""The probes: a frozen backbone run once over the images (cached features), then a
logistic-regression head; ``linear`` on the last stage, ``stage-probe`` on the best stage.
"""

from __future__ import annotations

import dataclasses
import json
import time
from abc import abstractmethod

import numpy as np
import torch
import torch.nn.functional as F

from finetune.data.features import HEAD, extract_features, probe_points
from finetune.errors import ConfigError
from finetune.files import atomic_write
from finetune.model.backbone import (
    Classifier,
    freeze,
    prune_to_stage,
)
from finetune.strategies.base import FitContext, Strategy, register
from finetune.strategies.logistic import fit_probe
from finetune.training.loop import EpochResult, Recorder

__all__ = ["Linear", "StageProbe"]


# --- probes: frozen backbone, features computed once, logistic-regression head --------------


class _Probe(Strategy):
    trains_backbone = False

    @abstractmethod
    def candidates(self, model: Classifier) -> list[str]:
        """Probe points to try (see finetune.data.features)."""

    def fit(self, ctx: FitContext) -> list[EpochResult]:
        start = time.perf_counter()
        model, config = ctx.model, ctx.config
        freeze(model.backbone)
        if config.channels_last:  # NHWC: the layout oneDNN's convolutions prefer
            model.backbone.to(memory_format=torch.channels_last)
        points = self.candidates(model)
        common = {
            "device": ctx.device,
            "num_workers": config.num_workers or 0,
            "cache": config.feature_cache,
            "progress": ctx.verbose,
            "channels_last": bool(config.channels_last),
        }
        train_f, hit_train = extract_features(
            model.backbone, ctx.split.train, ctx.pre, points, desc="features (train)", **common
        )
        val_f, hit_val = extract_features(
            model.backbone, ctx.split.val, ctx.pre, points, desc="features (val)", **common
        )
        ctx.say(
            f"features  {len(train_f['label'])} train + {len(val_f['label'])} val images, "
            f"{'from the cache' if hit_train and hit_val else 'computed once'} in "
            f"{time.perf_counter() - start:.1f} s, at {', '.join(points)}"
        )
        num_classes = len(ctx.split.classes)
        results = {
            p: fit_probe(
                train_f[p],
                train_f["label"],
                num_classes,
                seed=config.seed,
                balanced=config.balance not in (None, "none"),
            )
            for p in points
        }
        best = max(points, key=lambda p: (results[p].cv_accuracy, p == HEAD))
        if len(points) > 1:
            table = ", ".join(f"{p} {results[p].cv_accuracy:.3f}" for p in points)
            ctx.say(f"probe     cross-validated accuracy: {table} -> {best}")
        points_record = {
            p: {"cv_accuracy": r.cv_accuracy, "C": r.C, "cv_by_C": r.cv_by_C}
            for p, r in results.items()
        }
        record = {"chosen": best, "points": points_record}
        atomic_write(ctx.run.probe, json.dumps(record, indent=2) + "\n")
        spec = dataclasses.replace(ctx.meta.model, head="linear")  # the probe's own head
        if best != HEAD:
            stage = int(best.removeprefix("stage"))
            prune_to_stage(model.backbone, stage)
            spec = dataclasses.replace(spec, stage=stage, num_features=model.num_features)
        model.head = results[best].linear().to(ctx.device)
        metrics = [
            _probe_metrics(results[best].logits(f[best]), f["label"]) for f in (train_f, val_f)
        ]
        result = EpochResult(
            epoch=1,
            train_loss=metrics[0][0],
            train_acc=metrics[0][1],
            val_loss=metrics[1][0],
            val_acc=metrics[1][1],
            lr=0.0,
            seconds=time.perf_counter() - start,
            best=True,
            gap=metrics[0][1] - metrics[1][1],
        )
        recorder = Recorder(ctx.run_dir, dataclasses.replace(ctx.meta, model=spec))
        recorder.record(result, model)
        ctx.on_epoch(result)
        return [result]


def _probe_metrics(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    t_logits = torch.from_numpy(logits).float()
    t_labels = torch.from_numpy(labels).long()
    loss = F.cross_entropy(t_logits, t_labels).item()
    return loss, float((logits.argmax(1) == labels).mean())


@register
class Linear(_Probe):
    """Little data, similar images: a logistic-regression head on the backbone's top features."""

    name = "linear"
    summary = "little data, similar images: features computed once, logistic regression on top"

    def candidates(self, model: Classifier) -> list[str]:
        return [HEAD]


@register
class StageProbe(_Probe):
    """Little data, different images: probe every stage, keep the best by cross-validation."""

    name = "stage-probe"
    summary = "little data, different images: a probe per stage, keeps the stages up to the best"

    def candidates(self, model: Classifier) -> list[str]:
        points = probe_points(model.backbone)
        if len(points) == 1:
            raise ConfigError(
                f"{type(model.backbone).__name__} exposes no intermediate stages "
                "(forward_intermediates); use --strategy linear."
            )
        return points
