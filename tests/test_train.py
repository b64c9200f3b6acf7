"""The training loop: metrics, best-epoch selection, checkpoints per epoch."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.checkpoint import load_checkpoint
from finetune.errors import TrainingError
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


class _Poisoned(nn.Module):
    """A linear model whose training forward passes numbered in ``poison`` give NaN."""

    def __init__(self, poison: set[int] | None = None, from_call: int | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 2)
        self.poison, self.from_call, self.calls = poison or set(), from_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.training:
            self.calls += 1
            if self.calls in self.poison or (self.from_call and self.calls >= self.from_call):
                return out * float("nan")
        return out


class _CheckingRecorder(Recorder):
    """Fails the test if a checkpoint with a non-finite tensor is ever about to be written."""

    def record(self, result, model, resume_state=None) -> None:
        assert all(torch.isfinite(t).all() for t in model.state_dict().values())
        assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss)
        super().record(result, model, resume_state)


def _fit(run_dir: Path, epochs: int = 4, **poison):
    torch.manual_seed(0)
    model = _Poisoned(**poison)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * 8)
    run_dir.mkdir()
    describe = {"model": {}, "classes": ["a", "b"], "preprocessing": {}}
    history = train(
        model,
        optimizer,
        scheduler,
        _loader(x, y),
        _loader(x[:32], y[:32]),
        epochs=epochs,
        device=torch.device("cpu"),
        recorder=_CheckingRecorder(run_dir, describe),
        progress=False,
    )
    return history, optimizer


def test_a_nan_loss_restarts_the_epoch_at_half_the_lr_and_never_reaches_a_checkpoint(
    tmp_path: Path,
) -> None:
    clean, clean_opt = _fit(tmp_path / "clean")
    # Batch 3 of epoch 2 (training forward call 11) gives NaN once.
    with pytest.warns(UserWarning, match=r"non-finite.*half the learning rate \(retry 1/3\)"):
        history, optimizer = _fit(tmp_path / "nan", poison={11})
    assert [r.epoch for r in history] == [1, 2, 3, 4]
    assert history[0].train_loss == clean[0].train_loss  # epoch 1 untouched
    assert history[-1].val_acc > 0.9  # recovered and learned
    assert optimizer.param_groups[0]["lr"] == pytest.approx(clean_opt.param_groups[0]["lr"] / 2)
    assert all(math.isfinite(r.train_loss) for r in history)
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(tmp_path / "nan" / name)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values())


def test_a_loss_that_stays_nan_stops_with_a_clear_message_and_a_good_last_checkpoint(
    tmp_path: Path,
) -> None:
    with (
        pytest.warns(UserWarning, match="retry") as retries,
        pytest.raises(TrainingError, match=r"NaN or infinite in epoch 2 .* lower --lr"),
    ):
        _fit(tmp_path / "nan", from_call=9)  # every batch from epoch 2 on
    assert [str(w.message)[-4:-1] for w in retries] == ["1/3", "2/3", "3/3"]
    last = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    rows = list(csv.DictReader((tmp_path / "nan" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"]
