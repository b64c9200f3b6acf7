"""``finetune.fit`` end to end on real images."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import finetune
from finetune.config import FitConfig
from finetune.data.scan import scan_folder
from finetune.data.transforms import PRESETS, Preprocessing
from finetune.errors import ConfigError
from finetune.strategies.loaders import training_loaders
from finetune.strategies.measure import LOTS_PER_CLASS

from .conftest import copy_classes, noise_folder


def test_fit_writes_a_complete_run_directory(linear_run: finetune.FitResult, fashion) -> None:
    run = linear_run
    assert {p.name for p in run.dir.iterdir()} >= {
        "best.pt",
        "last.pt",
        "metrics.csv",
        "config.json",
        "classes.json",
    }
    assert json.loads((run.dir / "classes.json").read_text()) == sorted(
        p.name for p in (fashion / "train").iterdir()
    )
    config = json.loads((run.dir / "config.json").read_text())
    # Resolved values are recorded: a probe makes one pass over the images.
    assert config["strategy"] == "linear" and config["epochs"] == 1
    assert config["image_size"] == 64
    rows = list(csv.DictReader((run.dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1]
    assert float(rows[-1]["val_acc"]) == pytest.approx(run.history[-1].val_acc)
    assert run.best_metric == max(r.val_acc for r in run.history)
    # Real features of real images: far better than the 10% of chance.
    assert run.best_metric > 0.6
    assert json.loads((run.dir / "probe.json").read_text())["chosen"] == "head"


def test_same_seed_gives_the_same_metrics_and_another_seed_does_not(
    small_folder: Path, tmp_path: Path
) -> None:
    common = {"strategy": "finetune-all", "epochs": 2, "image_size": 32, "batch_size": 8}
    runs = [
        finetune.fit(
            small_folder, seed=seed, out=str(tmp_path / name), verbose=False, **common, report=False
        )
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    a, b, c = (r.history for r in runs)
    assert [(r.train_loss, r.val_loss, r.val_acc) for r in a] == [
        (r.train_loss, r.val_loss, r.val_acc) for r in b
    ]
    assert [r.train_loss for r in a] != [r.train_loss for r in c]


class _MLPHead(nn.Module):
    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_custom_head_trains_and_loads(small_folder: Path, tmp_path: Path) -> None:
    head = _MLPHead(1280, 3)
    run = finetune.fit(
        small_folder,
        strategy="finetune-top",
        head=head,
        epochs=1,
        image_size=32,
        out=str(tmp_path / "r"),
        verbose=False,
        report=False,
    )
    with pytest.raises(finetune.FinetuneError, match="custom head"):
        finetune.load(run.dir)
    predictor = finetune.load(run.dir, head=_MLPHead(1280, 3))
    assert len(predictor.predict(next(small_folder.rglob("*.png")))) == 1


def test_fit_rejects_bad_heads_and_options_before_any_work(
    small_folder: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"\(N, 3\)"):
        finetune.fit(small_folder, strategy="finetune-all", head=nn.Linear(1280, 5), verbose=False)
    with pytest.raises(ConfigError, match="fits its own linear head"):
        finetune.fit(small_folder, strategy="linear", head=nn.Linear(1280, 3), verbose=False)
    with pytest.raises(ConfigError, match="valid options"):
        finetune.fit(small_folder, epoch=1, verbose=False)
    out = tmp_path / "once"
    finetune.fit(small_folder, strategy="linear", image_size=32, out=str(out), verbose=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        finetune.fit(small_folder, strategy="linear", image_size=32, out=str(out), verbose=False)


def test_every_public_name_resolves() -> None:
    for name in finetune.__all__:
        assert getattr(finetune, name) is not None, name


def test_auto_decides_says_why_and_records_it(small_folder: Path, tmp_path: Path) -> None:
    run = finetune.fit(
        small_folder, image_size=32, out=str(tmp_path / "auto"), verbose=False, report=False
    )
    assert run.config.strategy == run.strategy == "stage-probe"  # few Fashion-MNIST images
    decision = json.loads((run.dir / "decision.json").read_text())
    assert decision["strategy"] == "stage-probe"
    assert decision["cell"] == "little data, different from ImageNet"
    assert decision["size"]["images"] == 48 and decision["size"]["classes"] == 3
    assert decision["batchnorm_shift"] > decision["thresholds"]["similar_below_batchnorm_shift"]
    assert decision["reasons"] and run.decision is not None
    assert decision["hyperparameters"]["image_size"] == run.config.image_size == 32
    assert "cross-validation" in decision["hyperparameters"]["head"]
    saved = torch.load(run.best_checkpoint, weights_only=True)["decision"]
    assert json.loads(json.dumps(saved)) == decision


def test_plan_measures_and_estimates_without_training(small_folder: Path) -> None:
    plan = finetune.plan(small_folder, image_size=32)
    assert plan.strategy == "stage-probe" and plan.decision is not None
    assert plan.estimate_seconds > 0
    fixed = finetune.plan(small_folder, strategy="finetune-all", epochs=10, image_size=32)
    assert fixed.decision is None and fixed.config.epochs == 10
    # Ten training passes (forward + backward) take longer than one inference pass, even when
    # the timings that make both estimates are taken on a busy machine.
    assert fixed.estimate_seconds > plan.estimate_seconds


def test_auto_records_every_hyperparameter_of_a_fine_tune(tmp_path: Path) -> None:
    folder = noise_folder(tmp_path / "noise", math.ceil(LOTS_PER_CLASS / 0.8))
    plan = finetune.plan(folder, epochs=2, image_size=32, lr=1e-3)
    assert plan.strategy == "finetune-all" and plan.decision is not None
    assert plan.decision.hyperparameters == {
        "image_size": 32,
        "batch_size": plan.config.batch_size,
        "balance": "none",
        "epochs": 2,
        "optimizer": plan.config.optimizer,
        "head_lr": 1e-3,
        "top_backbone_lr": pytest.approx(1e-3 * plan.config.backbone_lr_scale),
        "layer_decay": plan.config.layer_decay,
        "unfreeze": "all",
        "warmup_epochs": 0,
        "weight_decay": plan.config.weight_decay,
        "schedule": "cosine",
        "ema": False,
        "augment": PRESETS["default"].to_dict(),  # 200 images per class: the default preset
    }


def test_augmentation_is_chosen_recorded_and_tta_scores_val(
    small_folder: Path, tmp_path: Path
) -> None:
    run = finetune.fit(
        small_folder,
        strategy="finetune-top",
        epochs=1,
        image_size=32,
        vflip=True,
        lighting=0.3,
        tta="flip",
        out=str(tmp_path / "aug"),
        verbose=False,
        report=False,
    )
    assert run.config.augment == "strong"  # 16 training images per class: little data
    saved = torch.load(run.best_checkpoint, weights_only=True)["augmentation"]
    assert saved["preset"] == "strong" and saved["vflip"] and saved["lighting"] == 0.3
    assert saved["crop_scale"] == list(PRESETS["strong"].crop_scale)
    assert saved["pca_lighting"]["source"] == "training set (48 images)"
    assert json.loads((run.dir / "config.json").read_text())["vflip"] is True
    # tta.json holds the val accuracy of best.pt averaged over the flip views, which --tta
    # fixed as the run's mode whatever the scores of the others.
    record = json.loads((run.dir / "tta.json").read_text())
    predictor = finetune.load(run.dir)
    data = scan_folder(small_folder)
    probs = predictor.predict_proba([s.path for s in data.val], tta="flip")
    expected = float(np.mean(probs.argmax(1) == [s.label for s in data.val]))
    assert {k: record[k] for k in ("tta", "val_acc", "val_images")} == {
        "tta": "flip", "val_acc": expected, "val_images": len(data.val)
    }  # fmt: skip
    assert record["fixed"] and record["chosen"] == "flip" and record["accuracy"]["flip"] == expected
    assert set(record["accuracy"]) == {"none", "flip", "10crop"}
    assert run.tta_val_acc == expected and predictor.resolve_tta("auto") == "flip"
    # The probes see each image once: nothing to augment, nothing recorded.
    probe = finetune.fit(small_folder, strategy="linear", image_size=32, verbose=False,
                         out=str(tmp_path / "probe"), report=False)  # fmt: skip
    assert torch.load(probe.best_checkpoint, weights_only=True)["augmentation"] is None


def test_augment_preview_draws_what_training_sees(small_folder: Path, tmp_path: Path) -> None:
    out = finetune.augment_preview(
        small_folder, tmp_path / "p" / "preview.png", images=3, versions=4, augment="strong"
    )
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 400 and img.height > 300
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.std() > 20  # images, not a blank page
    # A folder that exists gets the picture inside it, beside what it holds.
    (tmp_path / "p" / "notes.txt").write_text("mine")
    inside = finetune.augment_preview(small_folder, tmp_path / "p", images=2, versions=2)
    assert inside == tmp_path / "p" / "augment-preview.png" and inside.stat().st_size > 0
    assert (tmp_path / "p" / "notes.txt").read_text() == "mine" and out.is_file()


def test_imbalanced_classes_are_balanced_and_it_is_said(tmp_path: Path) -> None:
    folder = copy_classes(tmp_path / "data", ["bag"], 40)
    copy_classes(folder, ["sneaker", "trouser"], 6)
    split = scan_folder(folder)
    assert split.report.imbalance == pytest.approx(32 / 5)
    with pytest.warns(UserWarning, match="classes imbalanced 6.4x"):  # said, even when quiet
        run = finetune.fit(folder, strategy="linear", image_size=32, out=str(tmp_path / "r"),
                           verbose=False, report=False)  # fmt: skip
    assert run.config.balance == "weighted-loss"
    assert json.loads((run.dir / "config.json").read_text())["balance"] == "weighted-loss"
    with pytest.warns(UserWarning, match="imbalanced"):
        kept = finetune.fit(folder, strategy="linear", image_size=32, balance="none",
                            out=str(tmp_path / "n"), verbose=False, report=False)  # fmt: skip
    assert kept.config.balance == "none"
    # Oversampling: one epoch of the training loader draws every class about equally often.
    train_loader, _ = training_loaders(
        split,
        Preprocessing(32, (0.5,) * 3, (0.5,) * 3, 0.875, "bicubic"),
        FitConfig(balance="oversample", num_workers=0, batch_size=8),
        torch.device("cpu"),
        PRESETS["none"],
        None,
    )
    drawn = np.bincount(torch.cat([labels for _, labels in train_loader]).numpy(), minlength=3)
    assert drawn.sum() == 40 and drawn.min() >= 7  # plain shuffling: 32, 4, 4
