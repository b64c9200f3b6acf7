"""``finetune.fit`` end to end on real images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import finetune
from finetune.errors import ConfigError, NotAvailableError


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
    assert config["strategy"] == "linear" and config["epochs"] == 3
    assert config["image_size"] == 64 and config["lr"] == 1e-3  # resolved values are recorded
    rows = list(csv.DictReader((run.dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["val_acc"]) == pytest.approx(run.history[-1].val_acc)
    assert run.best_metric == max(r.val_acc for r in run.history)
    # Real features of real images: far better than the 10% of chance after three epochs.
    assert run.best_metric > 0.5


def test_same_seed_gives_the_same_metrics_and_another_seed_does_not(
    small_folder: Path, tmp_path: Path
) -> None:
    common = {"strategy": "finetune-all", "epochs": 2, "image_size": 32, "batch_size": 8}
    runs = [
        finetune.fit(small_folder, seed=seed, out=str(tmp_path / name), verbose=False, **common)
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
        small_folder, head=head, epochs=1, image_size=32, out=str(tmp_path / "r"), verbose=False
    )
    with pytest.raises(finetune.FinetuneError, match="custom head"):
        finetune.load(run.dir)
    predictor = finetune.load(run.dir, head=_MLPHead(1280, 3))
    assert len(predictor.predict(next(small_folder.rglob("*.png")))) == 1


def test_fit_rejects_bad_heads_options_and_auto_before_any_work(
    small_folder: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"\(N, 3\)"):
        finetune.fit(small_folder, head=nn.Linear(1280, 5), epochs=1, verbose=False)
    with pytest.raises(ConfigError, match="valid options"):
        finetune.fit(small_folder, epoch=1, verbose=False)
    with pytest.raises(NotAvailableError):
        finetune.fit(small_folder, strategy="auto", verbose=False)
    out = tmp_path / "once"
    finetune.fit(small_folder, epochs=1, image_size=32, out=str(out), verbose=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        finetune.fit(small_folder, epochs=1, image_size=32, out=str(out), verbose=False)


def test_every_public_name_resolves() -> None:
    for name in finetune.__all__:
        assert getattr(finetune, name) is not None, name
