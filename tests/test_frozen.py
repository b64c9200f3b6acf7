"""Frozen layers run once (finetune/frozen.py): where models split, that the view computes what
the model computes, and that a fine-tune from the cache trains exactly as one from the images."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import finetune
from finetune.config import FitConfig
from finetune.data.loaders import ImageDataset
from finetune.data.scan import scan_folder
from finetune.data.transforms import PRESETS, Augmentation, Preprocessing, eval_transform
from finetune.errors import ConfigError
from finetune.model.backbone import create_backbone, create_classifier, param_groups
from finetune.model.frozen import (
    FrozenPrefix,
    compute_frozen,
    find_prefix,
    frozen_loader,
    frozen_views,
    run_prefix,
    skip_prefix,
    view_agrees,
)
from finetune.run.checkpoint import load_checkpoint
from finetune.strategies import get_strategy
from finetune.strategies.loaders import seeded_batches
from finetune.training.loop import read_metrics

from .conftest import copy_classes


def _top(model: nn.Module, trained: int) -> nn.Module:
    """Freeze all but the top ``trained`` backbone groups, as finetune-top does."""
    strategy = get_strategy("finetune-top")
    strategy.param_groups(model, FitConfig(unfreeze=trained), 1e-3)
    return model


def _lite0(trained: int = 3) -> nn.Module:
    return _top(create_classifier(create_backbone("tf_efficientnet_lite0"), 3), trained).eval()


def test_only_augmentations_without_random_draws_keep_the_frozen_input() -> None:
    assert frozen_views(PRESETS["none"]) == (1, "")
    assert frozen_views(Augmentation.from_preset("none", hflip=True)) == (2, "")
    for preset in ("light", "default", "strong"):
        views, why = frozen_views(PRESETS[preset])
        assert views == 0 and "random resized crops" in why and "colour jitter" in why
    views, why = frozen_views(Augmentation.from_preset("none", vflip=True))
    assert views == 0 and "vertical flips" in why
    assert "PCA lighting" in frozen_views(Augmentation.from_preset("none", lighting=0.1))[1]


def test_efficientnet_splits_below_its_first_trained_group_and_the_view_agrees() -> None:
    model = _lite0(trained=3)  # stem + blocks 0-3 frozen; blocks 4-6 (+ conv_head) train
    images = torch.randn(4, 3, 64, 64)
    prefix = find_prefix(model, images)
    assert isinstance(prefix, FrozenPrefix)
    assert prefix.skipped == (
        "backbone.conv_stem", "backbone.bn1",
        *(f"backbone.blocks.{i}" for i in range(4)),
    )  # fmt: skip
    assert prefix.output == "backbone.blocks.3" and prefix.first_trained == "backbone.blocks.4"
    out = run_prefix(model, prefix, images)
    assert out.shape == (4, 80, 4, 4)  # blocks.3: 80 channels at stride 16
    assert view_agrees(model, prefix, images)
    view = skip_prefix(model, prefix)
    torch.testing.assert_close(view(out), model(images), rtol=1e-5, atol=1e-5)
    # The view shares the model's parameters, and the model is left whole.
    assert {id(p) for p in view.parameters()} < {id(p) for p in model.parameters()}
    assert isinstance(model.backbone.blocks[0], nn.Sequential)
    assert isinstance(view.backbone.blocks[0], nn.Identity)
    assert view.head is model.head and view.backbone.blocks[4] is model.backbone.blocks[4]

    head_only = find_prefix(_lite0(trained=0), images)  # only the head trains
    assert head_only.output == "backbone.bn2"  # pooling runs in the view
    assert "backbone.global_pool" not in head_only.skipped


def test_a_resnet_skips_its_parameterless_stem_layers_too() -> None:
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model = _top(create_classifier(backbone, 3), trained=2).eval()
    images = torch.randn(2, 3, 64, 64)
    prefix = find_prefix(model, images)
    assert "backbone.act1" in prefix.skipped and "backbone.maxpool" in prefix.skipped
    assert view_agrees(model, prefix, images)


class _SkipAcross(nn.Module):
    """A frozen conv whose input is added back after a trained conv: no chain to cut."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Conv2d(3, 3, 3, padding=1)
        self.trained = nn.Conv2d(3, 3, 3, padding=1)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trained(self.frozen(x)) + x


def test_models_whose_layers_do_not_chain_fail_the_check() -> None:
    images = torch.randn(2, 3, 8, 8)
    model = _SkipAcross()
    prefix = find_prefix(model, images)
    assert prefix.skipped == ("frozen",)
    assert not view_agrees(model, prefix, images)
    # a ViT adds its position embedding between modules, outside any module
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0)
    vit = _top(create_classifier(vit, 3), trained=2).eval()
    images = torch.randn(2, 3, 32, 32)
    prefix = find_prefix(vit, images)
    assert isinstance(prefix, FrozenPrefix)
    assert not view_agrees(vit, prefix, images)
    everything = find_prefix(_top(create_classifier(create_backbone("tf_efficientnet_lite0"), 3),
                                  trained=8), torch.randn(2, 3, 32, 32))  # fmt: skip
    assert isinstance(everything, str) and "no frozen layer" in everything


def test_outputs_are_the_frozen_layers_of_each_image_and_its_mirror(tmp_path: Path) -> None:
    model = _lite0()
    split = scan_folder(copy_classes(tmp_path / "data", ["bag", "shirt"], 6))
    pre = Preprocessing.from_model(model.backbone, 32)
    images = torch.randn(2, 3, 32, 32)
    prefix = find_prefix(model, images)
    out = compute_frozen(model, prefix, split.train, split.val, pre, 2, device=torch.device("cpu"),
                         progress=False)  # fmt: skip
    assert out.train.shape[:2] == (len(split.train), 2) and len(out.val) == len(split.val)
    image, label = ImageDataset(split.train[:1], eval_transform(pre))[0]
    with torch.no_grad():
        as_is = run_prefix(model, prefix, image[None])[0]
        mirrored = run_prefix(model, prefix, image.flip(-1)[None])[0]
    close = {"rtol": 1e-3, "atol": 1e-4}  # batched against alone: other kernels' rounding
    torch.testing.assert_close(out.train[0, 0], as_is, **close)
    torch.testing.assert_close(out.train[0, 1], mirrored, **close)
    assert not torch.allclose(as_is, mirrored, **close)
    assert out.train_labels[0] == label
    # Training batches draw either version, from the batch's seed: the same seed, the same draw.
    batches = seeded_batches(out.train_labels.tolist(), FitConfig(batch_size=4))
    loader = frozen_loader(out.train, out.train_labels, batch_sampler=batches)
    batches.set_epoch(1)
    first = [x for x, _ in loader]
    batches.set_epoch(1)
    again = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    flat = torch.cat(first)
    picked = [bool((out.train[:, 1] == x).flatten(1).all(1).any()) for x in flat]
    assert 0 < sum(picked) < len(picked)  # some mirrored, some not


def _fit(data: Path, out: Path, **options) -> finetune.FitResult:
    """A short finetune-top run without augmentation (``options`` override any of it)."""
    settings = {"strategy": "finetune-top", "epochs": 2, "image_size": 32, "augment": "none",
                "verbose": False, **options}  # fmt: skip
    return finetune.fit(data, out=str(out), report=False, **settings)


def test_a_fine_tune_from_the_cache_trains_exactly_as_one_from_the_images(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    data = copy_classes(tmp_path / "data", ["bag", "sneaker", "trouser"], 16)
    options = {"ema": True, "dropout": 0.2}  # the average is evaluated through the view too
    cached = _fit(data, tmp_path / "cached", verbose=True, **options)
    said = capfd.readouterr().err
    assert "frozen    backbone.conv_stem ... backbone.blocks.3 run once" in said
    assert "training starts at backbone.blocks.4" in said
    images = _fit(data, tmp_path / "images", cache_frozen=False, **options)
    a, b = read_metrics(cached.dir / "metrics.csv"), read_metrics(images.dir / "metrics.csv")
    for x, y in zip(a, b, strict=True):
        for name in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "ema_val_acc"):
            assert math.isclose(getattr(x, name), getattr(y, name), rel_tol=1e-5), name
    for name in ("best.pt", "last.pt", "ema.pt"):
        mine, theirs = (load_checkpoint(r.dir / name)["state_dict"] for r in (cached, images))
        assert mine.keys() == theirs.keys()  # the whole model, no view in the checkpoint
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-5)
    assert load_checkpoint(cached.dir / "best.pt")["frozen"]["views"] == 1
    # The checkpoint predicts from images: its val accuracy is the one measured from the cache.
    predictor = finetune.load(cached.dir, device="cpu")
    split = scan_folder(data, seed=0)
    hits = [p.label == split.classes[s.label]
            for p, s in zip(predictor.predict([s.path for s in split.val]), split.val,
                            strict=True)]  # fmt: skip
    assert sum(hits) / len(hits) == pytest.approx(cached.best_metric)


def test_asking_for_the_cache_where_it_cannot_run_says_why(tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "data", ["bag", "trouser"], 6)
    with pytest.raises(ConfigError, match=r"random resized crops.*--augment none"):
        _fit(data, tmp_path / "a", augment="default", cache_frozen=True)
    with pytest.raises(ConfigError, match="needs --strategy finetune-top"):
        _fit(data, tmp_path / "b", strategy="finetune-all", cache_frozen=True)
    with pytest.raises(ConfigError, match="no frozen layer runs before"):
        _fit(data, tmp_path / "c", unfreeze=len(param_groups(_lite0())) - 1, cache_frozen=True)


class _CrashingHead(nn.Linear):
    """A linear head that raises at its ``crash_at``-th training call of 4 images: a run that
    dies in epoch 2 after epoch 1 was saved (the split check's calls, on 8 images, and the
    validation passes, in eval mode, do not count)."""

    calls = 0  # on the class: the copies the split check makes count too

    def __init__(self, crash_at: int) -> None:
        super().__init__(1280, 3)
        self.crash_at = crash_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and len(x) == 4:
            type(self).calls += 1
            if type(self).calls == self.crash_at:
                raise RuntimeError("crashed")
        return super().forward(x)


def test_a_run_from_the_cache_resumes_exactly(tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "data", ["bag", "sneaker", "trouser"], 10)  # 24 train
    options = {"epochs": 3, "batch_size": 4, "hflip": True, "dropout": 0.2, "ema": True}

    def head(crash_at: int = 0) -> nn.Module:
        torch.manual_seed(0)  # the same initial head for every run
        return _CrashingHead(crash_at)

    whole = _fit(data, tmp_path / "whole", head=head(), **options)
    _CrashingHead.calls = 0
    with pytest.raises(RuntimeError, match="crashed"):
        _fit(data, tmp_path / "crashed", head=head(crash_at=7), **options)  # 6 steps an epoch
    assert [r.epoch for r in read_metrics(tmp_path / "crashed" / "metrics.csv")] == [1]
    resumed = finetune.resume(tmp_path / "crashed", head=head(), verbose=False, report=False)
    mine, theirs = (read_metrics(r.dir / "metrics.csv") for r in (resumed, whole))
    assert len(mine) == 3
    assert mine == [replace(r, seconds=m.seconds) for r, m in zip(theirs, mine, strict=True)]
    for name in ("last.pt", "ema.pt"):
        a, b = (load_checkpoint(r.dir / name)["state_dict"] for r in (whole, resumed))
        assert all(torch.equal(a[key], b[key]) for key in a), name
