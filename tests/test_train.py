"""The training loop: metrics, best-epoch selection, checkpoints per epoch."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.checkpoint import load_checkpoint
from finetune.train import Recorder, evaluate, train


def _loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=8)


def test_loop_learns_records_every_epoch_and_keeps_the_best(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long()  # learnable from one feature
    model = nn.Linear(5, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1000)
    seen = []
    history = train(
        model,
        optimizer,
        scheduler,
        _loader(x, y),
        _loader(x[:32], y[:32]),
        epochs=4,
        device=torch.device("cpu"),
        recorder=Recorder(tmp_path, {"model": {}, "classes": ["a", "b"], "preprocessing": {}}),
        progress=False,
        on_epoch=seen.append,
    )
    assert seen == history and [r.epoch for r in history] == [1, 2, 3, 4]
    assert history[-1].train_loss < history[0].train_loss
    assert history[-1].val_acc > 0.9
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert len(rows) == 4 and float(rows[2]["train_loss"]) == history[2].train_loss
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["best_metric"] == max(r.val_acc for r in history)
    assert [r.epoch for r in history if r.best][-1] == best["epoch"]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 4
    loss, acc = evaluate(model, _loader(x[:32], y[:32]), torch.device("cpu"))
    assert acc == history[-1].val_acc and abs(loss - history[-1].val_loss) < 1e-6
