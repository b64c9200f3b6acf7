"""Backbones, the shipped ImageNet weights, heads and layer groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import skimage
import sklearn
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from finetune.data.images import load_image
from finetune.data.transforms import Preprocessing, eval_transform
from finetune.errors import ModelError
from finetune.model.backbone import Classifier, create_backbone, create_classifier, param_groups

SKIMAGE = Path(skimage.__file__).parent / "data"
SKLEARN = Path(sklearn.__file__).parent / "datasets" / "images"
# Real photos shipped inside installed packages, and the ImageNet classes a correct model names.
PHOTOS = {
    SKIMAGE / "chelsea.png": {"tabby, tabby cat", "tiger cat", "Egyptian cat"},
    SKIMAGE / "coffee.png": {"espresso"},
    SKIMAGE / "rocket.jpg": {"missile", "projectile, missile"},
    SKIMAGE / "motorcycle_left.png": {"moped", "motor scooter, scooter"},
    SKLEARN / "china.jpg": {"palace", "monastery"},
}


@pytest.fixture(scope="module")
def imagenet_model() -> nn.Module:
    return create_backbone("tf_efficientnet_lite0", keep_classifier=True).eval()


def test_shipped_weights_name_real_photos_correctly(imagenet_model: nn.Module) -> None:
    info = timm.data.ImageNetInfo()
    transform = eval_transform(Preprocessing.from_model(imagenet_model))
    batch = torch.stack([transform(image=load_image(p))["image"] for p in PHOTOS])
    with torch.inference_mode():
        probs = imagenet_model(batch).softmax(1)
    for (photo, expected), p in zip(PHOTOS.items(), probs, strict=True):
        top1 = info.index_to_description(int(p.argmax()))
        assert top1 in expected, f"{photo.name}: predicted {top1!r}, expected one of {expected}"
        right = sum(float(p[i]) for i in range(1000) if info.index_to_description(i) in expected)
        assert right > 0.2, f"{photo.name}: only {right:.2f} on the right classes"


def test_random_weights_do_not_pass_the_photo_test() -> None:
    """The photo test can fail: an unmapped model names the photos wrongly."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    info = timm.data.ImageNetInfo()
    transform = eval_transform(Preprocessing.from_model(model))
    batch = torch.stack([transform(image=load_image(p))["image"] for p in PHOTOS])
    with torch.inference_mode():
        top1 = [info.index_to_description(int(i)) for i in model(batch).argmax(1)]
    hits = sum(t in e for t, e in zip(top1, PHOTOS.values(), strict=True))
    assert hits <= 1


def test_backbone_without_classifier_gives_pooled_features() -> None:
    backbone = create_backbone("tf_efficientnet_lite0")
    model = create_classifier(backbone, 7).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_features(x).shape == (2, 1280)
    assert model(x).shape == (2, 7)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 7


def test_custom_head_is_any_module() -> None:
    head = nn.Sequential(nn.Linear(1280, 64), nn.ReLU(), nn.Linear(64, 3))
    model = create_classifier(create_backbone("tf_efficientnet_lite0"), 3, head)
    assert isinstance(model, Classifier) and model.head is head
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_param_groups_cover_every_parameter_once_with_the_head_last() -> None:
    model = create_classifier(create_backbone("tf_efficientnet_lite0"), 4)
    groups = param_groups(model)
    assert groups[-1].name == "head" and groups[-1].layer == len(groups) - 1
    assert [g.layer for g in groups] == sorted(g.layer for g in groups)
    seen = [id(p) for g in groups for p in g.params]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    assert groups[0].params[0] is model.backbone.conv_stem.weight


# the multi-dimensional parameters each model exempts from weight decay by name (timm's
# no_weight_decay()); norms and biases are exempt everywhere
NAMED_EXEMPT = {
    "tf_efficientnet_lite0": set(),
    "resnet18": set(),
    "test_vit": {"backbone.cls_token", "backbone.pos_embed"},
}


@pytest.mark.parametrize("name", NAMED_EXEMPT)
def test_param_groups_list_what_weight_decay_skips(name: str) -> None:
    model = create_classifier(create_backbone(name, pretrained=False), 4)
    groups = param_groups(model)
    skipped = {id(p) for g in groups for p in g.no_decay}
    for group in groups:
        assert {id(p) for p in group.no_decay} <= {id(p) for p in group.params}
    named = dict(model.named_parameters())
    assert {n for n, p in named.items() if id(p) in skipped and p.ndim > 1} == NAMED_EXEMPT[name]
    assert all(id(p) in skipped for p in named.values() if p.ndim <= 1)
    assert id(model.head.weight) not in skipped and id(model.head.bias) in skipped


def test_weights_file_round_trip(tmp_path: Path) -> None:
    reference = create_backbone("tf_efficientnet_lite0", keep_classifier=True).eval()
    file = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(file))
    loaded = create_backbone("tf_efficientnet_lite0", weights=file).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        assert torch.allclose(loaded(x), expected)
    # a state_dict saved with torch.save, with a 10-class classifier: the classifier is dropped
    other = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    torch.save(other.state_dict(), tmp_path / "ten.pth")
    create_backbone("tf_efficientnet_lite0", weights=tmp_path / "ten.pth")


def test_weight_errors_say_how_to_fix(tmp_path: Path) -> None:
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ModelError, match="--model"):
        create_backbone("tf_efficientnet_lite0", weights=tmp_path / "resnet.pth")
    with pytest.raises(ModelError, match="does not exist"):
        create_backbone("tf_efficientnet_lite0", weights=tmp_path / "nope.safetensors")
    with pytest.raises(ModelError, match="Did you mean resnet18"):
        create_backbone("resnt18")
    with pytest.raises(ModelError, match="--weights PATH"):
        create_backbone("resnet18")  # HF_HUB_OFFLINE=1: not in the cache, cannot download
    # A pattern is not a model, with or without --weights (timm.list_models matched it).
    for weights in (tmp_path / "resnet.pth", None):
        with pytest.raises(ModelError, match=r"'resnet\*' is a pattern \(it matches \d+: resnet"):
            create_backbone("resnet*", weights=weights)
