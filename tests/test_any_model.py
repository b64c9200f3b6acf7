"""The "works for any timm model" claims, checked over four architectures, as timm's own tests run
its interface contract over every registered model: a BatchNorm CNN (EfficientNet), a ResNet, a
ViT and a ConvNeXt, timm's tiny ``test_*`` variants with random weights (``pretrained=False``).

One file for the contract (param groups, stage cuts and probe points, the frozen split, exports)
rather than a parametrized test in each module's test file: the architectures and their input
sizes are declared once, and a new architecture is one line here.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from finetune.config import FitConfig
from finetune.data.features import HEAD, extract_features, probe_points
from finetune.data.loaders import ImageDataset
from finetune.data.scan import Sample, scan_folder
from finetune.data.transforms import Preprocessing, eval_transform
from finetune.inference.export import export, read_onnx, read_torchscript
from finetune.model.backbone import (
    Classifier,
    create_backbone,
    create_classifier,
    default_unfreeze,
    layer_group_count,
    param_groups,
    prune_to_stage,
    set_train_mode,
)
from finetune.model.frozen import FrozenPrefix, find_prefix, run_prefix, skip_prefix, view_agrees
from finetune.run.checkpoint import CheckpointMeta, ModelSpec, save_checkpoint
from finetune.strategies import get_strategy

from .conftest import copy_classes

# name -> input side. The ViT runs at its own size: a checkpoint rebuilds it with timm's
# defaults (its position embedding is sized for them); the CNNs take any size.
ARCHITECTURES = {
    "test_efficientnet": 64,  # BatchNorm CNN, inverted residual blocks
    "test_resnet": 64,  # BatchNorm ResNet: stem conv + pool, four residual layers
    "test_vit": 160,  # ViT: patch embedding, class token and position embedding, blocks
    "test_convnext": 64,  # ConvNeXt: LayerNorm, a norm + MLP head module
}
# Whether the model's layers chain at the frozen split, so its bottom can run once: a ViT's
# position embedding and class token are added between modules, in its forward method.
CHAINS = {"test_efficientnet": True, "test_resnet": True, "test_vit": False, "test_convnext": True}
NAMES = list(ARCHITECTURES)


def _classifier(name: str, num_classes: int = 3, **kwargs) -> Classifier:
    torch.manual_seed(0)  # the same random weights every time
    return create_classifier(create_backbone(name, pretrained=False, **kwargs), num_classes)


def _images(name: str, n: int = 2) -> torch.Tensor:
    side = ARCHITECTURES[name]
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))


def _first_calls(model: nn.Module, images: torch.Tensor) -> dict[str, int]:
    """The order in which ``model``'s submodules are first called on ``images``."""
    clock, first, handles = itertools.count(), {}, []

    def hook(name: str):
        def record(*_) -> None:  # returns None: a pre-hook's value would replace the input
            first.setdefault(name, next(clock))

        return record

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(hook(name)))
    with torch.no_grad():
        model.eval()(images)
    for handle in handles:
        handle.remove()
    return first


# --- model/backbone.py: param_groups, layer groups -------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_hold_every_parameter_once_input_to_output_head_last(name: str) -> None:
    model = _classifier(name)
    groups = param_groups(model)
    *body, head = groups
    assert len(body) == layer_group_count(model.backbone) >= 4  # stem, stages..., top
    assert head.name == "head" and head.params == list(model.head.parameters())
    assert [g.layer for g in groups] == list(range(len(groups)))
    seen = [id(p) for g in groups for p in g.params]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    # Input to output: each group's first module to run runs after the group below's.
    owner = {id(p): module for module in model.modules() for p in module.parameters(False)}
    name_of = {module: n for n, module in model.named_modules()}
    called = _first_calls(model, _images(name))
    starts = []
    for group in body:
        ticks = [called[name_of[owner[id(p)]]] for p in group.params
                 if name_of[owner[id(p)]] in called]  # fmt: skip
        starts.append(min(ticks))  # (a ViT's position embedding is called by no module)
    assert starts == sorted(starts) and len(set(starts)) == len(starts), starts
    assert 1 <= default_unfreeze(len(body)) < len(body)


@pytest.mark.parametrize("name", NAMES)
def test_finetune_top_freezes_exactly_the_groups_below_the_top_ones(name: str) -> None:
    model = _classifier(name)
    *body, _ = param_groups(model)
    k = default_unfreeze(len(body))
    optimizer_groups = get_strategy("finetune-top").param_groups(model, FitConfig(), lr=1e-3)
    assert [g["name"] for g in optimizer_groups] == [*(g.name for g in body[-k:]), "head"]
    for i, group in enumerate(body):
        assert all(p.requires_grad == (i >= len(body) - k) for p in group.params), group.name


# --- model/backbone.py prune_to_stage, data/features.py probe_points + extract_features -----


@pytest.fixture(scope="module")
def few_images(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    root = tmp_path_factory.mktemp("any-model")
    return scan_folder(copy_classes(root / "data", ["bag", "sneaker", "trouser"], 2)).train


@pytest.mark.parametrize("name", NAMES)
def test_a_backbone_cut_at_a_stage_computes_the_features_probed_there(
    name: str, few_images: list[Sample]
) -> None:
    backbone = _classifier(name).backbone.eval()
    points = probe_points(backbone)
    stages = len(backbone.feature_info)
    assert points == [*(f"stage{i}" for i in range(stages)), HEAD] and stages >= 4
    pre = Preprocessing.from_model(backbone, ARCHITECTURES[name])
    features, cached = extract_features(
        backbone, few_images, pre, points, device=torch.device("cpu"), cache=False, progress=False
    )
    assert not cached and list(features["label"]) == [s.label for s in few_images]
    images = torch.stack([image for image, _ in ImageDataset(few_images, eval_transform(pre))])
    with torch.no_grad():
        whole = backbone(images)
    torch.testing.assert_close(torch.from_numpy(features[HEAD]), whole, rtol=1e-4, atol=1e-5)
    size = sum(p.numel() for p in backbone.parameters())
    for stage in range(stages):
        cut = prune_to_stage(copy.deepcopy(backbone), stage).eval()
        probed = torch.from_numpy(features[f"stage{stage}"])
        assert probed.shape == (len(few_images), backbone.feature_info[stage]["num_chs"])
        assert cut.num_features == probed.shape[1], stage
        with torch.no_grad():
            torch.testing.assert_close(cut(images), probed, rtol=1e-4, atol=1e-5)
            # a probe head fitted on those features fits the cut backbone
            assert create_classifier(cut, 3).eval()(images).shape == (len(few_images), 3)
        if stage < stages - 1:  # the layers above the stage are gone, not just unused
            assert sum(p.numel() for p in cut.parameters()) < size, stage


# --- model/frozen.py: find_prefix, run_prefix, skip_prefix -----------------------------------


def _top(name: str, drop_path_rate: float = 0.0) -> tuple[Classifier, list[dict]]:
    """finetune-top's model (its default top groups train) and its optimizer groups."""
    model = _classifier(name, drop_path_rate=drop_path_rate)
    return model, get_strategy("finetune-top").param_groups(model, FitConfig(), lr=1e-3)


def _running_stats(model: nn.Module, trainable: bool) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and any(p.requires_grad for p in m.parameters()) == trainable]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_the_frozen_split_runs_the_bottom_once_and_the_view_computes_the_rest(name: str) -> None:
    model, _ = _top(name, drop_path_rate=0.2)  # training mode draws random numbers above the split
    images = _images(name, 4)
    prefix = find_prefix(model, images)
    assert isinstance(prefix, FrozenPrefix), prefix
    trained = {n for n, m in model.named_modules() if any(p.requires_grad for p in m.parameters())}
    assert not set(prefix.skipped) & trained  # no skipped module holds a trained parameter
    assert prefix.first_trained in trained and prefix.output in prefix.skipped
    model.eval()
    with torch.no_grad():
        bottom = run_prefix(model, prefix, images)
    view = skip_prefix(model, prefix)
    # The view shares the model's parameters, less the skipped modules' (which stay in the model).
    assert {id(p) for p in view.parameters()} < {id(p) for p in model.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} <= {
        id(p) for p in view.parameters()
    }
    frozen_stats = _running_stats(model, trainable=False)
    agrees = []
    for training in (True, False):
        for module in (model, view):
            if training:
                set_train_mode(module)
            else:
                module.eval()
        with torch.no_grad():
            torch.manual_seed(0)
            want = model(images)
            torch.manual_seed(0)
            try:
                got = view(bottom)
            except Exception:  # the view cannot even take the prefix's output
                got = None
        agrees.append(got is not None and torch.allclose(got, want, rtol=1e-4, atol=1e-5))
    # frozen BatchNorm stayed in eval mode: its running statistics did not move
    after = _running_stats(model, trainable=False)
    assert all(torch.equal(a, b) for a, b in zip(frozen_stats, after, strict=True))
    # Where the layers chain, the view computes the model in both modes; where they do not,
    # it does not, and view_agrees (the check training runs first) says so.
    assert agrees == [CHAINS[name]] * 2
    assert view_agrees(model, prefix, images) == CHAINS[name]


@pytest.mark.parametrize("name", [n for n in NAMES if CHAINS[n]])
def test_training_through_the_view_trains_the_model_above_the_split(name: str) -> None:
    model, groups = _top(name)
    images = _images(name, 4)
    prefix = find_prefix(model, images)
    with torch.no_grad():
        bottom = run_prefix(model.eval(), prefix, images)
    view = skip_prefix(model, prefix)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    set_train_mode(view)
    optimizer = torch.optim.SGD(groups, lr=0.1)
    nn.functional.cross_entropy(view(bottom), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(before[id(p)], p), n
    # Every group that trains moved (not every tensor: timm zero-initialises a ResNet block's
    # last BatchNorm scale, so the convolutions before it get no gradient at the first step).
    for group in groups:
        assert any(not torch.equal(before[id(p)], p) for p in group["params"]), group["name"]


# --- inference/export.py: TorchScript and ONNX of a Classifier -------------------------------


def _checkpoint(model: Classifier, name: str, folder: Path) -> Path:
    pre = Preprocessing.from_model(model.backbone, ARCHITECTURES[name])
    meta = CheckpointMeta(ModelSpec(name, model.num_features), ("a", "b", "c"), pre)
    path = folder / "best.pt"
    save_checkpoint(path, {**meta.to_dict(), "state_dict": model.state_dict()})
    return path


@pytest.mark.parametrize("name", NAMES)
def test_torchscript_and_onnx_exports_answer_as_the_eager_model(name: str, tmp_path: Path) -> None:
    model = _classifier(name).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 1)  # logits far apart enough that a wrong graph shows
    checkpoint = _checkpoint(model, name, tmp_path)
    images = _images(name, 3)  # the exports were traced on 2 images: the batch is dynamic
    with torch.no_grad():
        eager = model(images)
    scripted, meta = read_torchscript(export(checkpoint, format="torchscript"))
    assert meta["model"]["name"] == name and meta["classes"] == ["a", "b", "c"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(scripted(images), eager, rtol=1e-4, atol=1e-4)
    onnx, meta = read_onnx(export(checkpoint, format="onnx"))
    assert meta["preprocessing"]["input_size"] == ARCHITECTURES[name]
    torch.testing.assert_close(onnx(images), eager, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(eager[0], eager[1], atol=1e-3)  # the images' answers differ
