"""The learning-rate range test: exponential LRs, groups keep their ratios, divergence stops
it, the suggestion and the plot; it trains through fit's own step (precision, class weights);
user mistakes are FinetuneErrors, a clean message in the CLI."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import finetune
from finetune.errors import ConfigError, DataError, TrainingError
from finetune.model.backbone import create_backbone
from finetune.training.loop import TrainStep
from finetune.training.lr_range import LRFinding, find_lr, plot_lr_finding

from .conftest import FASHION, copy_classes

CPU = torch.device("cpu")


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
    result = find_lr(TrainStep(model, optimizer, CPU), loader, steps=12, end_lr=1e-2,
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


def _real_batch(per_class: int = 4, side: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Real Fashion images of two classes, scaled as the shipped weights expect."""
    images, labels = [], []
    for label, name in enumerate(("bag", "sneaker")):
        for path in sorted((FASHION / "train" / name).glob("*.png"))[:per_class]:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB").resize((side, side)), dtype=np.float32)
            images.append(torch.from_numpy(rgb / 127.5 - 1).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def test_the_finder_records_the_loss_of_fits_step_under_bf16_and_class_weights() -> None:
    # The loss the finder records for its first step is the one the shared training step
    # computes for that batch under bf16 autocast with the class weights; not the plain one.
    # The head trains on the real features of real images (as finetune-top's top part does on
    # its frozen layers' outputs): bf16 is emulated, so slow, on CPUs without bf16 arithmetic.
    images, labels = _real_batch()
    with torch.no_grad():
        features = create_backbone("tf_efficientnet_lite0").eval()(images)
    loader = DataLoader(TensorDataset(features, labels), batch_size=len(labels))
    torch.manual_seed(0)
    head = nn.Linear(features.shape[1], 2)
    twin, plain = copy.deepcopy(head), copy.deepcopy(head)
    numerics = {"amp": torch.bfloat16, "class_weights": torch.tensor([0.2, 5.0])}

    def step(module: nn.Module, **options) -> TrainStep:
        optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
        return TrainStep(module, optimizer, CPU, **options)

    found = find_lr(step(head, **numerics), loader, steps=10, end_lr=1e-4, progress=False)
    expected = step(twin, **numerics)(features, labels).loss.item()
    assert found.losses[0] == pytest.approx(expected, rel=1e-6)
    fp32 = step(plain)(features, labels).loss.item()
    assert abs(found.losses[0] - fp32) > 1e-3 * fp32


@pytest.mark.filterwarnings("ignore:.*classes imbalanced")
def test_the_class_weights_of_the_run_reach_lr_finds_loss(tmp_path: Path) -> None:
    # Same seed, same model, same first batch: only the loss's class weights differ.
    data = copy_classes(tmp_path / "data", ["bag", "sneaker"], 12)
    for path in sorted((data / "sneaker").glob("*.png"))[3:]:
        path.unlink()  # 12 bags, 3 sneakers: imbalanced

    def first_loss(balance: str) -> float:
        found = finetune.lr_find(
            data, strategy="finetune-top", image_size=32, batch_size=8, steps=10, end_lr=1e-4,
            balance=balance, out=tmp_path / "plot.png", verbose=False,
        )  # fmt: skip
        return found.losses[0]

    assert first_loss("weighted-loss") != pytest.approx(first_loss("none"), rel=1e-2)


@pytest.mark.parametrize(
    ("steps", "start_lr", "end_lr", "match"),
    [
        (5, 1e-7, 10.0, r"steps=5 \(--steps\) is too few .* at least 10"),
        (100, 1.0, 0.1, r"start_lr=1 \(--start-lr\) must be below end_lr=0.1"),
        (100, 1e-3, 1e-3, r"start_lr=0.001 .* must be below end_lr=0.001"),
        (100, 0.0, 10.0, r"start_lr=0 \(--start-lr\) must be a positive number"),
        (100, 1e-7, -1.0, r"end_lr=-1 \(--end-lr\) must be a positive number"),
        (100, 1e-7, math.inf, r"end_lr=inf .* must be a positive number"),
    ],
)
def test_a_range_that_cannot_work_is_refused_before_anything_is_built(
    small_folder: Path, tmp_path: Path, steps: int, start_lr: float, end_lr: float, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        finetune.lr_find(
            small_folder, steps=steps, start_lr=start_lr, end_lr=end_lr,
            out=tmp_path / "x.png", verbose=False,
        )  # fmt: skip
    assert not (tmp_path / "x.png").exists()


def test_too_few_images_is_a_data_error(tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "data", ["bag", "sneaker"], 1)
    with pytest.raises(DataError, match="fewer than 2 readable images"):
        finetune.lr_find(data, strategy="finetune-top", out=tmp_path / "x.png", verbose=False)


def test_a_loader_without_a_single_batch_is_a_data_error() -> None:
    x = torch.randn(8, 4)
    failed = DataLoader(TensorDataset(x, torch.zeros(8).long()), collate_fn=lambda batch: None)
    model = nn.Linear(4, 2)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=1.0), CPU)
    with pytest.raises(DataError, match=r"no batch .* `finetune check DATA`"):
        find_lr(step, failed, steps=10, progress=False)


class _NaNAfter(nn.Module):
    """A linear model whose forward passes after the first give NaN: the loss diverges."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.calls = nn.Linear(4, 2), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x) * (1.0 if self.calls == 1 else float("nan"))


def test_a_loss_that_diverges_at_once_says_to_lower_the_start_lr() -> None:
    model = _NaNAfter()
    x = torch.randn(16, 4)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=1.0), CPU)
    with pytest.raises(TrainingError, match=r"diverged within 3 steps.*--start-lr"):
        find_lr(step, loader, steps=10, progress=False)
    assert model.calls == 2  # a non-finite loss ends the test at once


def test_an_optimizer_without_a_head_lr_is_refused() -> None:
    model = nn.Linear(4, 2)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), CPU)
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8).long()))
    with pytest.raises(ConfigError, match=r"head\) group has lr 0"):
        find_lr(step, loader, steps=10, progress=False)


def test_the_cli_says_what_is_wrong_with_the_range_without_a_traceback(
    small_folder: Path, tmp_path: Path
) -> None:
    exe = Path(sys.executable).with_name("finetune")
    result = subprocess.run(
        [str(exe), "lr-find", str(small_folder), "--start-lr", "1", "--end-lr", "0.1",
         "-o", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Error: start_lr=1 (--start-lr) must be below end_lr=0.1 (--end-lr)" in result.stderr
    assert "Traceback" not in result.stderr


def test_lr_find_never_overwrites_a_file_it_was_not_asked_to_write(
    finding: LRFinding, tmp_path: Path
) -> None:
    """-o names the plot; the numbers beside it replace only an earlier lr-find's, and a file
    of the user's there is refused before anything is trained (no data is even read here)."""
    mine = tmp_path / "x.json"
    mine.write_text("my numbers")
    with pytest.raises(ConfigError, match=r"x\.json exists and is not the numbers of an earlier"):
        finetune.lr_find(tmp_path / "no-data", out=tmp_path / "x.png", verbose=False)
    assert mine.read_text() == "my numbers"
    from finetune.training.lr_range import output_paths  # where -o's files go

    assert finding.plot is not None
    assert output_paths(finding.plot) == (finding.plot, finding.plot.with_suffix(".json"))
    assert output_paths(tmp_path) == (tmp_path / "lr-find.png", tmp_path / "lr-find.json")
    with pytest.raises(ConfigError, match=r"cannot be a \.json file"):
        output_paths(tmp_path / "plot.json")
