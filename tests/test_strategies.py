"""Each strategy's contract: what trains, frozen BatchNorm stays put, the result predicts and
reloads; and auto's decision on small synthetic extremes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

import finetune
from finetune.config import FitConfig
from finetune.data.scan import scan_folder
from finetune.data.transforms import PRESETS, Preprocessing
from finetune.errors import ConfigError
from finetune.model.backbone import (
    create_backbone,
    create_classifier,
    default_unfreeze,
    layer_group_count,
    param_groups,
    set_train_mode,
)
from finetune.run.checkpoint import CheckpointMeta, ModelSpec, load_checkpoint, rebuild_model
from finetune.strategies import STRATEGIES, FitContext, get_strategy
from finetune.strategies.loaders import training_loaders
from finetune.strategies.measure import LOTS_PER_CLASS, decide
from finetune.training.loop import EpochResult, balanced_class_weights, read_metrics

from .conftest import copy_classes, noise_folder, photo_crops


def _model() -> nn.Module:
    return create_classifier(create_backbone("tf_efficientnet_lite0"), 3)


def _bn_stats(module: nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def _one_step(model: nn.Module, groups: list[dict]) -> None:
    optimizer = torch.optim.SGD(groups, lr=0.1)
    set_train_mode(model)
    loss = F.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()


def test_the_registry_holds_the_matrix_and_auto() -> None:
    assert set(STRATEGIES) == {"linear", "stage-probe", "finetune-top", "finetune-all", "auto"}
    with pytest.raises(ConfigError) as info:
        get_strategy("linaer")
    for name in STRATEGIES:
        assert name in str(info.value)


def test_finetune_top_trains_the_top_groups_and_frozen_batchnorm_does_not_move() -> None:
    model = _model()
    body = param_groups(model)[:-1]
    config = FitConfig(strategy="finetune-top", backbone_lr_scale=0.1, layer_decay=0.5)
    groups = get_strategy("finetune-top").param_groups(model, config, lr=1e-2)
    k = math.ceil(len(body) / 3)
    assert [g["name"] for g in groups] == [*(g.name for g in body[-k:]), "head"]
    # Discriminative LRs: head 1e-2, top backbone group 1e-3, halving below it.
    expected = [*(1e-3 * 0.5**i for i in reversed(range(k))), 1e-2]
    assert [g["lr"] for g in groups] == pytest.approx(expected)
    frozen, trained = body[0].params, body[-1].params
    assert not any(p.requires_grad for p in frozen) and all(p.requires_grad for p in trained)
    stem_bn = model.backbone.bn1
    before_stem = (model.backbone.conv_stem.weight.clone(), stem_bn.running_mean.clone())
    before_top = model.backbone.conv_head.weight.clone()
    _one_step(model, groups)
    assert not stem_bn.training and model.backbone.bn2.training
    assert torch.equal(before_stem[0], model.backbone.conv_stem.weight)
    assert torch.equal(before_stem[1], stem_bn.running_mean)  # frozen BN stats did not move
    assert not torch.equal(before_top, model.backbone.conv_head.weight)

    only_two = FitConfig(strategy="finetune-top", unfreeze=2)
    groups = get_strategy("finetune-top").param_groups(_model(), only_two, lr=1e-3)
    assert len(groups) == 3


def test_weighted_loss_weights_are_scikit_learns_balanced_weights() -> None:
    labels = [0] * 30 + [1] * 10 + [2] * 5  # imbalanced, every class present
    weights = balanced_class_weights(labels, 3, torch.device("cpu"))
    expected = compute_class_weight("balanced", classes=np.arange(3), y=np.array(labels))
    assert weights.tolist() == pytest.approx(expected.tolist())
    # A class without training images: scikit-learn refuses it; here it weighs as one image
    # would, and the others keep their ratios.
    weights = balanced_class_weights([0] * 6 + [2] * 2, 3, torch.device("cpu"))
    assert weights.tolist() == pytest.approx([8 / 18, 8 / 3, 8 / 6])


def test_finetune_all_trains_everything_with_layerwise_decay_and_a_warmup() -> None:
    model = _model()
    config = FitConfig(strategy="finetune-all", backbone_lr_scale=0.1, layer_decay=0.5)
    strategy = get_strategy("finetune-all")
    groups = strategy.param_groups(model, config, lr=1e-3)
    assert groups[-1]["name"] == "head" and groups[-1]["lr"] == 1e-3
    lrs = [g["lr"] for g in groups[:-1]]
    assert lrs[-1] == pytest.approx(1e-4) and lrs[0] == pytest.approx(1e-4 * 0.5 ** (len(lrs) - 1))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    warm = FitConfig(strategy="finetune-all", epochs=3, warmup_epochs=1)
    strategy.before_epoch(model, warm, 1)  # warm-up: the body is frozen, BN included
    before = _bn_stats(model.backbone)
    _one_step(model, groups)
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_stats(model.backbone), strict=True))
    strategy.before_epoch(model, warm, 2)  # then everything trains
    before_stem = model.backbone.conv_stem.weight.clone()
    _one_step(model, groups)
    assert not torch.equal(before_stem, model.backbone.conv_stem.weight)
    after = _bn_stats(model.backbone)
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def _same_predictions(run: finetune.FitResult, folder: Path) -> list[str]:
    images = sorted(folder.rglob("*.png"))
    predictor = finetune.load(run.dir)
    return [p.label for p in predictor.predict(images)]


def test_linear_keeps_the_pretrained_backbone_and_its_head_predicts_and_reloads(
    linear_run: finetune.FitResult, fashion: Path
) -> None:
    checkpoint = torch.load(linear_run.best_checkpoint, weights_only=True)
    pretrained = create_backbone("tf_efficientnet_lite0").state_dict()
    saved = {k.removeprefix("backbone."): v for k, v in checkpoint["state_dict"].items()}
    for name, tensor in pretrained.items():  # weights *and* BN running stats untouched
        assert torch.equal(tensor, saved[name]), name
    assert checkpoint["state_dict"]["head.weight"].shape == (10, 1280)
    predictions = finetune.load(linear_run.dir).predict(sorted((fashion / "test").rglob("*.png")))
    truth = [p.parent.name for p in sorted((fashion / "test").rglob("*.png"))]
    accuracy = np.mean([p.label == t for p, t in zip(predictions, truth, strict=True)])
    assert accuracy > 0.6  # held-out real images, 10 classes: chance is 0.1


def test_stage_probe_picks_a_stage_by_cross_validation_and_keeps_only_what_it_needs(
    small_folder: Path, tmp_path: Path
) -> None:
    run = finetune.fit(
        small_folder,
        strategy="stage-probe",
        image_size=32,
        out=str(tmp_path / "r"),
        verbose=False,
        report=False,
    )
    probe = json.loads((run.dir / "probe.json").read_text())
    points = probe["points"]
    assert set(points) == {"stage0", "stage1", "stage2", "stage3", "stage4", "head"}
    chosen = probe["chosen"]
    assert points[chosen]["cv_accuracy"] == max(p["cv_accuracy"] for p in points.values())
    checkpoint = torch.load(run.best_checkpoint, weights_only=True)
    if chosen != "head":
        stage = int(chosen.removeprefix("stage"))
        assert checkpoint["model"]["stage"] == stage
        assert not any(k.startswith("backbone.conv_head") for k in checkpoint["state_dict"])
    reloaded = finetune.load(run.dir)
    images = sorted(small_folder.rglob("*.png"))
    predictions = reloaded.predict(images)
    truth = [p.parent.name for p in images]
    assert np.mean([p.label == t for p, t in zip(predictions, truth, strict=True)]) > 0.8


_LOTS = math.ceil(LOTS_PER_CLASS / 0.8)  # 80% of each class trains (default val_split 0.2)


@pytest.mark.parametrize(
    ("kind", "per_class", "expected"),
    [
        ("photos", 12, "linear"),
        ("noise", 12, "stage-probe"),
        ("photos", _LOTS, "finetune-top"),
        ("noise", _LOTS, "finetune-all"),
    ],
)
def test_auto_places_synthetic_extremes_in_their_cell(
    kind: str, per_class: int, expected: str, tmp_path: Path
) -> None:
    if kind == "photos":
        folder = photo_crops(tmp_path / kind, per_class)
    else:
        folder = noise_folder(tmp_path / kind, per_class)
    backbone = create_backbone("tf_efficientnet_lite0")
    decision = decide(
        scan_folder(folder),
        backbone,
        device=torch.device("cpu"),
        image_size=32,
        epochs=None,
        batch_size=32,
    )
    assert decision.strategy == expected, decision.reasons
    assert decision.size.per_class_median == pytest.approx(per_class * 0.8, abs=1)
    assert decision.estimate_seconds > 0
    if expected.startswith("finetune"):
        assert 3 <= decision.settings["epochs"] <= 15
    groups = layer_group_count(backbone)
    if expected == "finetune-top":  # the top third of the layer groups train
        assert decision.settings["unfreeze"] == default_unfreeze(groups) == 3 < groups
    assert any("BatchNorm shift" in r for r in decision.reasons)


def test_auto_on_a_cpu_fits_the_budget_or_falls_back_to_the_probe(tmp_path: Path) -> None:
    split = scan_folder(noise_folder(tmp_path / "noise", _LOTS))
    backbone = create_backbone("tf_efficientnet_lite0")
    common = {"device": torch.device("cpu"), "image_size": None, "epochs": None, "batch_size": 32}
    roomy = decide(split, backbone, cpu_budget_seconds=10_000, **common)
    assert roomy.strategy == "finetune-all" and roomy.settings["epochs"] == 15
    assert roomy.settings["image_size"] == 64  # 32 px images: at most ~2x their size
    assert any("fit the" in r for r in roomy.reasons)
    tight = decide(split, backbone, cpu_budget_seconds=1, **common)
    assert tight.cell == "a lot of data, different from ImageNet"
    assert tight.strategy == "stage-probe" and "epochs" not in tight.settings
    assert tight.thresholds["cpu_budget_seconds"] == 1
    assert any("stage-probe instead" in r for r in tight.reasons)


def test_the_time_budget_option_reaches_auto(tmp_path: Path) -> None:
    folder = noise_folder(tmp_path / "noise", _LOTS)
    tight = finetune.plan(folder, time_budget=0.01, device="cpu")
    assert tight.decision.thresholds["cpu_budget_seconds"] == pytest.approx(0.6)
    assert tight.strategy == "stage-probe" and "0 min budget" in " ".join(tight.decision.reasons)
    with pytest.raises(ConfigError, match="time_budget must be a positive number of minutes"):
        FitConfig(time_budget=0)


def test_a_fine_tune_with_the_training_kit_follows_its_schedule_and_saves_its_averages(
    fashion, tmp_path: Path
) -> None:
    from finetune.training.loop import read_metrics
    from finetune.training.optim import lr_factor

    run = finetune.fit(
        fashion, strategy="finetune-top", epochs=4, image_size=32, ema=True, ema_decay=0.99,
        schedule="restarts", cycles=2, lr=2e-3, dropout=0.2, drop_path=0.1,
        label_smoothing=0.1, out=str(tmp_path / "kit"), verbose=False, report=False,
    )  # fmt: skip
    config = json.loads((run.dir / "config.json").read_text())
    for key, value in {"schedule": "restarts", "cycles": 2, "ema": True, "dropout": 0.2,
                       "drop_path": 0.1, "label_smoothing": 0.1}.items():  # fmt: skip
        assert config[key] == value
    # The LR of each epoch's last step is the schedule's: the head LR times its factor.
    steps = 400 // 32  # 400 training images, batches of 32, the last incomplete one dropped
    history = read_metrics(run.dir / "metrics.csv")
    for r in history:
        assert r.lr == pytest.approx(2e-3 * lr_factor(r.epoch * steps - 1, run.config, steps))
    # One snapshot per cosine cycle, taken at the end of the cycle.
    assert [p.name for p in run.snapshots] == ["snapshot-1.pt", "snapshot-2.pt"]
    assert [load_checkpoint(p)["epoch"] for p in run.snapshots] == [2, 4]
    # The average differs from the raw weights, and ema.pt is what scored ema_val_acc.
    ema = load_checkpoint(run.dir / "ema.pt")
    last = load_checkpoint(run.dir / "last.pt")
    key = "head.weight"
    assert not torch.allclose(ema["state_dict"][key], last["state_dict"][key])
    scored = next(r for r in history if r.epoch == ema["epoch"])
    accuracy = finetune.load(run.dir / "ema.pt", device="cpu").evaluate(fashion / "val").accuracy
    assert accuracy == pytest.approx(scored.ema_val_acc)
    assert run.best_ema is not None and run.best_ema.epoch == ema["epoch"]
    # Stochastic depth reached the backbone; frozen blocks skip no paths.
    model = rebuild_model(last)
    assert model.dropout.p == 0.0  # inference never drops: the rebuilt model has no dropout
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=False, drop_path_rate=0.1)
    rates = [m.drop_prob for m in backbone.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1, abs=0.01)
    classifier = create_classifier(backbone, 3, dropout=0.2)
    get_strategy("finetune-top").param_groups(classifier, FitConfig(unfreeze=3), lr=1e-3)
    set_train_mode(classifier)
    blocks = [m for m in backbone.modules()
              if any(type(c).__name__ == "DropPath" for c in m.children())]  # fmt: skip
    trains = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    assert any(trains) and not all(trains)
    for block, trained in zip(blocks, trains, strict=True):
        assert block.drop_path.training == trained  # a frozen block computes its features
    assert classifier.dropout.training and classifier.dropout.p == 0.2


def test_a_bf16_channels_last_fine_tune_learns_and_its_best_checkpoint_predicts(
    fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = finetune.fit(
        fashion, strategy="finetune-top", epochs=2, image_size=32, precision="bf16",
        channels_last=True, auto_batch_size=True, ema=True, out=str(tmp_path / "bf16"),
        report=False,
    )  # fmt: skip
    said = capsys.readouterr().err
    assert "auto batch size: on CPU memory does not limit the batch; keeping 32" in said
    assert "compute   cpu, bf16 autocast, channels_last, batch 32" in said
    config = json.loads((run.dir / "config.json").read_text())
    assert (config["precision"], config["channels_last"], config["batch_size"]) == (
        "bf16", True, 32)  # fmt: skip
    assert run.history[-1].train_loss < run.history[0].train_loss
    assert run.best_metric > 0.25  # 10 classes: chance is 0.1
    for name in ("best.pt", "ema.pt"):  # saved in the plain layout, whatever training used
        state = load_checkpoint(run.dir / name)["state_dict"]
        assert all(tensor.is_contiguous() for tensor in state.values()), name
    predictor = finetune.load(run.dir, device="cpu")  # fp32, contiguous
    predictions = predictor.predict(sorted((fashion / "val" / "bag").glob("*.png")))
    assert len(predictions) == 10 and {p.label for p in predictions} <= set(predictor.classes)
    accuracy = predictor.evaluate(fashion / "val").accuracy
    assert accuracy == pytest.approx(run.best_metric, abs=0.05)  # bf16 rounding moves a few


def test_a_compiled_fine_tune_saves_the_plain_uncompiled_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inductor takes minutes to compile on this 2-core CPU; the eager backend wraps the model
    # in the same OptimizedModule (TorchDynamo traces it) and compiles nothing.
    compiled: list[nn.Module] = []
    real_compile = torch.compile

    def compile_eagerly(module: nn.Module) -> nn.Module:
        compiled.append(real_compile(module, backend="eager"))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    data = copy_classes(tmp_path / "data", ["bag", "sneaker", "trouser"], 8)
    run = finetune.fit(
        data, strategy="finetune-top", epochs=1, image_size=32, compile=True, ema=True,
        out=str(tmp_path / "compiled"), verbose=False, report=False,
    )  # fmt: skip
    assert len(compiled) == 1 and any("_orig_mod." in k for k in compiled[0].state_dict())
    assert json.loads((run.dir / "config.json").read_text())["compile"] is True
    for name in ("best.pt", "last.pt", "ema.pt"):
        saved = load_checkpoint(run.dir / name)
        keys = [*saved["state_dict"], *saved.get("ema_state_dict", {})]
        assert keys and not any("_orig_mod" in key for key in keys), name
    prediction = finetune.load(run.dir, device="cpu").predict(next((data / "bag").iterdir()))
    assert prediction[0].label in ("bag", "sneaker", "trouser")


def test_an_epoch_brings_the_same_batches_whatever_the_workers_and_after_a_resume(
    small_folder: Path,
) -> None:
    split = scan_folder(small_folder)  # 48 training images: 6 batches of 8
    pre = Preprocessing(32, (0.5,) * 3, (0.5,) * 3, 0.875, "bicubic")

    def last_epoch(workers: int, epochs: list[int]):
        config = FitConfig(num_workers=workers, batch_size=8)
        loader, _ = training_loaders(split, pre, config, torch.device("cpu"), PRESETS["strong"],
                                     None)  # fmt: skip
        for epoch in epochs:
            loader.batch_sampler.set_epoch(epoch)
            batches = list(loader)
        return loader, batches

    # Two workers that live through epochs 1 and 2, against a run resumed at epoch 2 with none.
    persistent, through = last_epoch(2, [1, 2])
    _, resumed = last_epoch(0, [2])
    assert persistent.persistent_workers and len(through) == len(resumed) == 6
    for (images, labels), (again, labels_again) in zip(through, resumed, strict=True):
        assert torch.equal(images, again) and torch.equal(labels, labels_again)
    _, first = last_epoch(0, [1])
    assert not torch.equal(first[0][0], resumed[0][0])  # each epoch its own order and crops
    # uint8 batches (a quarter of float32's bytes), normalised on the device by the training
    # loop (tests/test_transforms.py: the same images as the float pipeline's)
    _, val = training_loaders(split, pre, FitConfig(batch_size=8), torch.device("cpu"),
                              PRESETS["strong"], None)  # fmt: skip
    assert through[0][0].dtype == next(iter(val))[0].dtype == torch.uint8


# Workers forked after this process used OpenCV's thread pool (a resize of a large image, as the
# decoded-cache fill does) once waited forever: each set its own OpenCV thread count, and
# the copied pool's condition variable still counted the parent's waiting threads.
_WORKERS_AFTER_OPENCV = """
import sys
import cv2, numpy as np, torch
from finetune.config import FitConfig
from finetune.data.scan import scan_folder
from finetune.data.features import extract_features
from finetune.model.backbone import create_backbone
from finetune.strategies.loaders import training_loaders
from finetune.data.transforms import PRESETS, Preprocessing

big = np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), dtype=np.uint8)
for _ in range(3):
    cv2.resize(big, (1000, 750), interpolation=cv2.INTER_AREA)  # OpenCV's pool, in use
split = scan_folder(sys.argv[1])
pre = Preprocessing(32, (0.5,) * 3, (0.5,) * 3, 0.875, "bicubic")
config = FitConfig(num_workers=2, batch_size=8)
train, val = training_loaders(split, pre, config, torch.device("cpu"), PRESETS["strong"], None)
print("batches", len(list(train)), len(list(val)), flush=True)
backbone = create_backbone("tf_efficientnet_lite0")
features, _ = extract_features(backbone, split.val, pre, ["head"], device=torch.device("cpu"),
                               batch_size=8, num_workers=2, cache=False, progress=False)
print("features", len(features["label"]), "threads", cv2.getNumThreads(), flush=True)
"""


def test_workers_start_after_the_main_process_used_opencv_threads(small_folder: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _WORKERS_AFTER_OPENCV, str(small_folder)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batches 6 " in done.stdout, done.stdout
    assert "features 12 threads 1" in done.stdout, done.stdout


# --- Strategy.fit on a FitContext built by hand: what each strategy trains and records -------


def _context(
    data: Path, run_dir: Path, strategy: str, **options
) -> tuple[FitContext, list[str], list[EpochResult]]:
    """A FitContext as ``finetune.fit`` resolves it: the shipped lite0, 32 px, no augmentation,
    no feature cache; what it says and the epochs it reports are collected in the lists."""
    from finetune.data.transforms import augmentation_of

    split = scan_folder(data)
    torch.manual_seed(0)
    model = create_classifier(create_backbone("tf_efficientnet_lite0"), len(split.classes))
    pre = Preprocessing.from_model(model.backbone, 32)
    settings = {"lr": 1e-3, "epochs": 2, "image_size": 32, "batch_size": 8, "num_workers": 0,
                "device": "cpu", "augment": "none", "feature_cache": False, **options}  # fmt: skip
    config = FitConfig(strategy=strategy, **settings)
    said: list[str] = []
    epochs: list[EpochResult] = []
    run_dir.mkdir(parents=True)
    ctx = FitContext(
        model=model, split=split, pre=pre, config=config, device=torch.device("cpu"),
        run_dir=run_dir,
        meta=CheckpointMeta(ModelSpec(config.model, model.num_features), split.classes, pre),
        verbose=False, say=said.append, on_epoch=epochs.append,
        augmentation=augmentation_of(config), lighting=None,
    )  # fmt: skip
    return ctx, said, epochs


def _val_accuracy(ctx: FitContext) -> float:
    """The model's accuracy on the validation images, from the images (not from features)."""
    from finetune.data.loaders import ImageDataset
    from finetune.data.transforms import eval_transform

    items = list(ImageDataset(ctx.split.val, eval_transform(ctx.pre)))
    images = torch.stack([image for image, _ in items])
    with torch.no_grad():
        predicted = ctx.model.eval()(images).argmax(1)
    return float((predicted == torch.tensor([label for _, label in items])).float().mean())


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_linear_fit_keeps_the_backbone_and_fits_a_head_that_predicts_above_chance(
    small_folder: Path, tmp_path: Path
) -> None:
    ctx, said, epochs = _context(small_folder, tmp_path / "run", "linear")
    backbone = _snapshot(ctx.model.backbone)
    history = get_strategy("linear").fit(ctx)
    assert len(history) == 1 and epochs == history and history[0].best
    after = ctx.model.backbone.state_dict()
    for name, tensor in backbone.items():  # weights and BatchNorm statistics alike
        assert torch.equal(tensor, after[name]), name
    assert not any(p.requires_grad for p in ctx.model.backbone.parameters())
    assert isinstance(ctx.model.head, nn.Linear) and ctx.model.head.weight.shape == (3, 1280)
    # real, easy images (bag, sneaker, trouser): chance is 1/3
    assert history[0].val_acc > 0.8
    assert _val_accuracy(ctx) == pytest.approx(history[0].val_acc)  # the head is the probe's
    assert json.loads((ctx.run_dir / "probe.json").read_text())["chosen"] == "head"
    assert load_checkpoint(ctx.run_dir / "best.pt")["model"]["head"] == "linear"
    assert any(line.startswith("features ") for line in said)


def test_stage_probe_fit_keeps_the_stages_up_to_the_best_cross_validated_one(
    small_folder: Path, tmp_path: Path
) -> None:
    ctx, _, epochs = _context(small_folder, tmp_path / "run", "stage-probe")
    features = ctx.model.backbone.feature_info
    history = get_strategy("stage-probe").fit(ctx)
    assert len(history) == 1 and epochs == history
    probe = json.loads((ctx.run_dir / "probe.json").read_text())
    assert list(probe["points"]) == [*(f"stage{i}" for i in range(len(features))), "head"]
    chosen = probe["chosen"]
    assert probe["points"][chosen]["cv_accuracy"] == max(
        p["cv_accuracy"] for p in probe["points"].values()
    )
    saved = load_checkpoint(ctx.run_dir / "best.pt")
    if chosen == "head":
        assert ctx.model.num_features == 1280 and saved["model"]["stage"] is None
    else:  # the backbone now ends at that stage, and the checkpoint says so
        stage = int(chosen.removeprefix("stage"))
        assert ctx.model.num_features == features[stage]["num_chs"] < 1280
        assert saved["model"]["stage"] == stage
        assert saved["model"]["num_features"] == ctx.model.num_features
    assert history[0].val_acc > 0.8
    assert _val_accuracy(ctx) == pytest.approx(history[0].val_acc)  # cut backbone + its head


def test_finetune_top_fit_trains_the_top_groups_and_the_head_and_nothing_below(
    tmp_path: Path,
) -> None:
    data = copy_classes(tmp_path / "data", ["bag", "sneaker", "trouser"], 8)  # 3 steps an epoch
    ctx, said, epochs = _context(data, tmp_path / "run", "finetune-top", unfreeze=1)
    *body, head = param_groups(ctx.model)
    before = {id(p): p.detach().clone() for p in ctx.model.parameters()}
    stats = _bn_stats(ctx.model.backbone)
    history = get_strategy("finetune-top").fit(ctx)
    assert [r.epoch for r in history] == [1, 2] and epochs == history
    for group in body[:-1]:
        assert all(torch.equal(before[id(p)], p) for p in group.params), group.name
    for group in (body[-1], head):
        assert all(not torch.equal(before[id(p)], p) for p in group.params), group.name
    # the frozen BatchNorm layers (all but the top group's) kept their running statistics
    moved = [not torch.equal(a, b) for a, b in zip(stats, _bn_stats(ctx.model.backbone),
                                                   strict=True)]  # fmt: skip
    assert any(moved) and not all(moved) and not any(moved[: len(moved) // 2])
    # without augmentation, the frozen layers ran once, before epoch 1
    assert any(line.startswith("frozen ") and "run once" in line for line in said), said
    assert [r.epoch for r in read_metrics(ctx.run_dir / "metrics.csv")] == [1, 2]
    assert load_checkpoint(ctx.run_dir / "last.pt")["epoch"] == 2


def test_finetune_all_fit_trains_only_the_head_during_warmup_then_every_group(
    tmp_path: Path,
) -> None:
    data = copy_classes(tmp_path / "data", ["bag", "sneaker", "trouser"], 8)
    ctx, _, _ = _context(data, tmp_path / "run", "finetune-all", warmup_epochs=1)
    stem = ctx.model.backbone.conv_stem.weight
    initial = (stem.detach().clone(), ctx.model.head.weight.detach().clone())
    after_epoch: dict[int, tuple[bool, bool]] = {}

    def on_epoch(result: EpochResult) -> None:  # has the stem moved, has the head?
        after_epoch[result.epoch] = (
            not torch.equal(initial[0], stem), not torch.equal(initial[1], ctx.model.head.weight)
        )  # fmt: skip

    ctx.on_epoch = on_epoch
    before = {id(p): p.detach().clone() for p in ctx.model.parameters()}
    history = get_strategy("finetune-all").fit(ctx)
    assert len(history) == 2
    assert after_epoch == {1: (False, True), 2: (True, True)}
    for group in param_groups(ctx.model):
        assert any(not torch.equal(before[id(p)], p) for p in group.params), group.name


def test_auto_fits_nothing_itself_and_resolves_to_a_strategy_that_does(
    small_folder: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    ctx, _, _ = _context(small_folder, tmp_path / "run", "auto", epochs=None)
    auto = get_strategy("auto")
    with pytest.raises(ConfigError, match="resolve"):
        auto.fit(ctx)
    chosen, config, decision = auto.resolve(ctx.split, ctx.model.backbone, ctx.config, ctx.device)
    assert decision is not None and decision.reasons and chosen.name == decision.strategy
    # 3 classes x 16 training images of 28 px clothes: little data, unlike ImageNet photos
    assert chosen.name == "stage-probe", decision.reasons
    assert all(getattr(config, k) == v for k, v in decision.settings.items()
               if getattr(ctx.config, k) in (None, 0))  # fmt: skip
    history = chosen.fit(replace(ctx, config=config))
    assert len(history) == 1 and history[0].val_acc > 0.8
