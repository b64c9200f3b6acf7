"""Frozen layers, run once: the bottom of a ``finetune-top`` model computed once per image.

``finetune-top`` freezes the bottom layer groups and keeps them in eval mode, so what they
compute for an image changes only when the image does. When the training augmentation draws no
random crop, colour change or lighting (``--augment none``, with or without left-right flips),
a training image reaches those layers in one version, or two (as it is, and mirrored).
:func:`compute_frozen` runs them once per version before epoch 1 and keeps their outputs in
memory; every epoch then trains and validates only the layers above them.

The split comes from the model itself, for any timm model. :func:`find_prefix` records the
order in which the model's modules run on a batch: the frozen prefix is every module that has
finished before the first module with a trainable parameter starts, up to the last of them that
has parameters. :func:`skip_prefix` gives a *view* of the model in which those modules are
``nn.Identity``; every other module, parameter and buffer is the model's own object, so training
the view trains the model, and checkpoints hold the whole model. The split is used only after a
check on real images (:func:`view_agrees`): given the prefix's output, the view must compute
what the model computes from the images, in training mode and in eval mode. A model whose layers
do not chain there (a skip connection across the boundary, arithmetic between modules) fails the
check and trains without the cache, and the reason is said.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler
from tqdm.auto import tqdm

from finetune.data.decoded import DecodedCache
from finetune.data.loaders import ImageDataset, collate_skipping_failed, prepare_for_workers
from finetune.data.scan import Sample
from finetune.data.transforms import (
    Augmentation,
    DeviceNormalize,
    Preprocessing,
    eval_transform,
)
from finetune.errors import ModelError
from finetune.model.backbone import autocast, set_train_mode

__all__ = [
    "FrozenOutputs",
    "FrozenPrefix",
    "compute_frozen",
    "find_prefix",
    "frozen_loader",
    "frozen_views",
    "run_prefix",
    "skip_prefix",
    "view_agrees",
]


def frozen_views(aug: Augmentation) -> tuple[int, str]:
    """How many versions of each training image the frozen layers see under ``aug``: 1 (the
    centre crop), 2 (it and its mirror image), or 0 and the reason when the augmentation draws
    something new every epoch."""
    random = []
    if aug.crop:
        random.append("random resized crops")
    if aug.vflip or aug.rotate90:
        random.append("vertical flips" if not aug.rotate90 else "90-degree rotations")
    if aug.jitter_p and (aug.brightness or aug.contrast or aug.saturation or aug.hue):
        random.append("colour jitter")
    if aug.lighting:
        random.append("PCA lighting")
    if random:
        return 0, (
            f"the augmentation ({', '.join(random)}) gives the frozen layers a new input every "
            "epoch"
        )
    return (2 if aug.hflip else 1), ""


@dataclass(frozen=True)
class FrozenPrefix:
    """Where a model splits into frozen layers run once and the layers above them."""

    skipped: tuple[str, ...]  # the model's modules the view replaces by nn.Identity, in order
    output: str  # the last of them: the layers above take its output
    first_trained: str  # the first module with a trainable parameter to run

    def describe(self) -> str:
        """e.g. "backbone.conv_stem ... backbone.blocks.3"."""
        if len(self.skipped) == 1:
            return self.skipped[0]
        return f"{self.skipped[0]} ... {self.skipped[-1]}"


def _call_order(model: nn.Module, images: torch.Tensor) -> dict[str, list[tuple[int, int]]]:
    """For every submodule that runs when ``model(images)`` does (eval mode): the (start, end)
    ticks of each of its calls, on one clock shared by all of them."""
    clock = itertools.count()
    calls: dict[str, list[tuple[int, int]]] = {}
    starts: dict[str, list[int]] = {}

    def hooks(name: str) -> tuple[Any, Any]:
        def before(_module: nn.Module, _args: Any) -> None:
            starts.setdefault(name, []).append(next(clock))

        def after(_module: nn.Module, _args: Any, _output: Any) -> None:
            calls.setdefault(name, []).append((starts[name].pop(), next(clock)))

        return before, after

    handles = []
    for name, module in model.named_modules():
        if name:
            before, after = hooks(name)
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return calls


def find_prefix(model: nn.Module, images: torch.Tensor) -> FrozenPrefix | str:
    """The frozen prefix of ``model`` (its trainable parameters already chosen), found from
    the order its modules run in on ``images``; or why there is none."""
    calls = _call_order(model, images)
    owners = [
        name
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    uncalled = [name for name in owners if name not in calls]
    if uncalled:  # e.g. a position embedding added in a forward method, outside any module
        return f"{uncalled[0] or 'the model'} uses trainable parameters outside its modules"
    if not owners:
        return "no module with trainable parameters runs"
    first = min(owners, key=lambda name: calls[name][0][0])
    start = calls[first][0][0]
    done = {name for name, ticks in calls.items() if ticks[-1][1] < start}
    top = [name for name in done if name.rpartition(".")[0] not in done]
    weighted = {name for name, module in model.named_modules() if next(module.parameters(), None)
                is not None}  # fmt: skip
    with_params = [name for name in top if name in weighted]
    if not with_params:
        return f"no frozen layer runs before the first trained one ({first})"
    output = max(with_params, key=lambda name: calls[name][-1][1])
    end = calls[output][-1][1]
    skipped = sorted(
        (name for name in top if calls[name][-1][1] <= end), key=lambda name: calls[name][0][0]
    )
    again = [name for name in skipped if len(calls[name]) > 1]
    if again:
        return f"{again[0]} runs more than once in a forward pass"
    while (parent := first.rpartition(".")[0]) in calls and calls[parent][0][0] > end:
        first = parent  # the outermost module that starts above the prefix, e.g. blocks.4
    return FrozenPrefix(tuple(skipped), output, first)


def skip_prefix(model: nn.Module, prefix: FrozenPrefix) -> nn.Module:
    """A view of ``model`` that takes the prefix's output as its input: the modules of
    ``prefix.skipped`` are ``nn.Identity`` in it, and every other module, parameter and buffer
    is the model's own (the containers on the way are shallow copies with their own table of
    children)."""
    copies = {"": _shallow(model)}
    for name in prefix.skipped:
        *path, leaf = name.split(".")
        parent = copies[""]
        for depth, part in enumerate(path):
            key = ".".join(path[: depth + 1])
            if key not in copies:
                copies[key] = _shallow(getattr(parent, part))
                setattr(parent, part, copies[key])
            parent = copies[key]
        setattr(parent, leaf, nn.Identity())
    return copies[""]


def _shallow(module: nn.Module) -> nn.Module:
    twin = copy.copy(module)
    twin._modules = dict(module._modules)  # the same children, in a table of its own
    return twin


class _Reached(Exception):
    """Raised by the hook on the prefix's last module: its output is all that is needed."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


def run_prefix(model: nn.Module, prefix: FrozenPrefix, images: torch.Tensor) -> torch.Tensor:
    """The output of the frozen prefix of ``model`` for ``images``; the layers above it are
    not run (the forward pass stops at ``prefix.output``)."""

    def stop(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        raise _Reached(output)

    handle = model.get_submodule(prefix.output).register_forward_hook(stop)
    try:
        model(images)
    except _Reached as reached:
        return reached.output
    finally:
        handle.remove()
    raise ModelError(f"{prefix.output} did not run in {type(model).__name__}'s forward pass.")


def view_agrees(
    model: nn.Module,
    prefix: FrozenPrefix,
    images: torch.Tensor,
    *,
    amp: torch.dtype | None = None,
) -> bool:
    """Whether the view of ``model`` computes, from the prefix's output for ``images``, what
    ``model`` computes from ``images``: in training mode (frozen layers in eval mode, as
    training runs them; the same random draws) and in eval mode. Checked on a copy of the
    model; the global random state is left as it was."""
    twin = copy.deepcopy(model)
    view = skip_prefix(twin, prefix)
    device = images.device
    # bf16 and fp16 round to 8 and 11 bits: the two paths' sums differ in the last of those
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if amp is not None else {"rtol": 1e-4, "atol": 1e-4}
    with (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        torch.no_grad(),
        autocast(device, amp),
    ):
        twin.eval()
        outputs = run_prefix(twin, prefix, images)
        for training in (True, False):
            for module in (twin, view):
                if training:
                    set_train_mode(module)
                else:
                    module.eval()
            torch.manual_seed(0)
            want = twin(images).float()
            torch.manual_seed(0)
            try:
                got = view(outputs).float()
            except Exception:  # e.g. shapes that only fit the image: the view does not chain
                return False
            if got.shape != want.shape or not torch.allclose(got, want, **tolerance):
                return False
    return True


@dataclass
class FrozenOutputs:
    """The frozen prefix's outputs for a run's images, computed once (on the CPU)."""

    prefix: FrozenPrefix
    train: torch.Tensor  # (training images, views, ...): each image as it is (and mirrored)
    train_labels: torch.Tensor  # (training images,)
    val: torch.Tensor  # (validation images, ...): the centre crops
    val_labels: torch.Tensor
    seconds: float  # how long computing them took

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in (self.train, self.val))


@torch.no_grad()  # not inference_mode: the outputs become training inputs, saved for backward
def _outputs(
    model: nn.Module,
    prefix: FrozenPrefix,
    samples: Sequence[Sample],
    pre: Preprocessing,
    views: int,
    *,
    device: torch.device,
    amp: torch.dtype | None,
    channels_last: bool,
    batch_size: int,
    num_workers: int,
    cache: DecodedCache | None,
    progress: bool,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    prepare_for_workers(num_workers)
    loader = DataLoader(
        ImageDataset(samples, eval_transform(pre, normalize=False), cache),  # uint8
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_skipping_failed,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # leaves torch's global random state alone
    )
    layout = torch.channels_last if channels_last else torch.contiguous_format
    normalize = DeviceNormalize.of(pre)
    chunks, labels = [], []
    for batch in tqdm(
        loader, desc=desc, unit="batch", leave=False, disable=None if progress else True
    ):
        if batch is None:  # every image of the batch failed to decode (already warned)
            continue
        # normalised here, exactly as the training loop normalises the image loaders' batches
        images = normalize(batch[0].to(device, non_blocking=True, memory_format=layout))
        versions = [images, images.flip(-1)][:views]  # the mirror image: HorizontalFlip's
        with autocast(device, amp):
            out = [run_prefix(model, prefix, x).contiguous().cpu() for x in versions]
        chunks.append(torch.stack(out, 1) if views > 1 else out[0])
        labels.append(batch[1])
    if not chunks:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(chunks), torch.cat(labels)


def compute_frozen(
    model: nn.Module,
    prefix: FrozenPrefix,
    train: Sequence[Sample],
    val: Sequence[Sample],
    pre: Preprocessing,
    views: int,
    *,
    device: torch.device,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    cache: DecodedCache | None = None,
    progress: bool = True,
) -> FrozenOutputs:
    """Run the frozen prefix of ``model`` (eval mode, under autocast to ``amp`` if given, as
    training would run it) once over the centre crops of ``train`` (and their mirror images
    when ``views`` is 2) and of ``val``. Images that fail to decode are left out, as the
    image loaders leave them out."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    common = {
        "device": device, "amp": amp, "channels_last": channels_last, "batch_size": batch_size,
        "num_workers": num_workers, "cache": cache, "progress": progress,
    }  # fmt: skip
    try:
        train_out, train_labels = _outputs(
            model, prefix, train, pre, views, desc="frozen layers (train)", **common
        )
        val_out, val_labels = _outputs(
            model, prefix, val, pre, 1, desc="frozen layers (val)", **common
        )
    finally:
        model.train(was_training)
    if views == 1:
        train_out = train_out.unsqueeze(1)
    return FrozenOutputs(
        prefix, train_out, train_labels, val_out, val_labels, time.perf_counter() - start
    )


class _Outputs(Dataset):
    """Frozen outputs by index. A training batch's keys are (index, seed) pairs: the seed draws
    each image's version (as it is, or mirrored: each half the time, as HorizontalFlip does)."""

    def __init__(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.outputs, self.labels = outputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
        if keys and isinstance(keys[0], tuple):  # training: (index, batch seed)
            index = torch.tensor([i for i, _ in keys])
            views = self.outputs.shape[1]
            rng = np.random.default_rng(keys[0][1])
            version = torch.from_numpy(rng.integers(0, views, len(keys)))
            return self.outputs[index, version], self.labels[index]
        index = torch.tensor(keys)
        return self.outputs[index], self.labels[index]

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([key])


def _whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch  # _Outputs.__getitems__ already returns the batch


def frozen_loader(
    outputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int | None = None,
    batch_sampler: Sampler[list[Any]] | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader of frozen outputs: training batches from ``batch_sampler`` (its keys (index,
    seed) pairs), or the outputs in order, ``batch_size`` at a time."""
    if batch_sampler is None:
        batch_sampler = BatchSampler(SequentialSampler(range(len(labels))), batch_size, False)
    return DataLoader(
        _Outputs(outputs, labels),
        batch_sampler=batch_sampler,
        collate_fn=_whole_batch,
        pin_memory=pin_memory,
        # Each pass draws a seed from the loader's generator, never from torch's global one
        # (which dropout uses, and last.pt saves): the same draws as the image loaders.
        generator=torch.Generator().manual_seed(0),
    )
