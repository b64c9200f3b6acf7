"""The learning-rate range test: exponential LRs, groups keep their ratios, divergence stops
it, the suggestion and the plot; lr-find refuses the probes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
from finetune.errors import ConfigError
from finetune.training.lr_range import LRFinding, plot_lr_finding

from .conftest import copy_classes


@pytest.fixture(scope="module")
def finding(tmp_path_factory: pytest.TempPathFactory) -> LRFinding:
    root = tmp_path_factory.mktemp("lr")
    data = copy_classes(root / "data", ["bag", "sneaker", "trouser", "sandal"], 16)
    return finetune.lr_find(
        data, strategy="finetune-top", image_size=32, batch_size=16, steps=40,
        out=root / "plot.png", verbose=False,
    )  # fmt: skip


def test_the_lr_grows_exponentially_and_the_loss_reacts(finding: LRFinding) -> None:
    lrs = np.array(finding.lrs)
    assert lrs[0] == pytest.approx(1e-7)
    ratios = lrs[1:] / lrs[:-1]
    assert ratios == pytest.approx(np.full(len(ratios), (10 / 1e-7) ** (1 / 39)))
    losses = np.array(finding.losses)
    assert np.isfinite(losses).all()
    # Real images, real weights: the loss falls somewhere on the way and the test ends by
    # diverging, as a range test should.
    assert losses.min() < losses[:5].mean() - 0.05
    assert finding.diverged and len(lrs) < 40
    assert finding.minimum == finding.lrs[int(losses.argmin())]
    assert finding.suggestion == pytest.approx(finding.minimum / 10)
    assert finding.lrs[4] <= finding.steepest <= finding.minimum


def test_the_plot_and_the_numbers_are_written(finding: LRFinding) -> None:
    assert finding.plot is not None
    with Image.open(finding.plot) as image:
        assert image.format == "PNG" and image.width >= 500 and image.height >= 300
    saved = json.loads(finding.plot.with_suffix(".json").read_text())
    assert saved["suggestion"] == pytest.approx(finding.suggestion)
    assert len(saved["lrs"]) == len(finding.lrs)


def test_backbone_groups_keep_their_ratio_to_the_head() -> None:
    from finetune.training.lr_range import find_lr

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.25},
            {"params": model[1].parameters(), "lr": 1.0},
        ]
    )
    x = torch.randn(32, 4)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8
    )
    result = find_lr(model, optimizer, loader, torch.device("cpu"), steps=12, end_lr=1e-2,
                     progress=False)  # fmt: skip
    assert len(result.lrs) == 12  # cycles the 4-batch loader
    body, head = (g["lr"] for g in optimizer.param_groups)
    assert head == pytest.approx(1e-2) and body == pytest.approx(0.25e-2)


def test_probes_have_no_lr_to_find(small_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no learning rate to find"):
        finetune.lr_find(small_folder, strategy="linear", out=tmp_path / "x.png", verbose=False)


def test_the_plot_marks_the_three_lrs(tmp_path: Path) -> None:
    lrs = tuple(float(v) for v in np.logspace(-6, 0, 30))
    losses = tuple(2 - math.exp(-((math.log10(lr) + 2) ** 2)) for lr in lrs)
    finding = LRFinding(lrs, losses, minimum=1e-2, steepest=1e-3, diverged=False)
    out = plot_lr_finding(finding, tmp_path / "p.png")
    with Image.open(out) as image:
        assert image.format == "PNG"
