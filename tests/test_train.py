"""The training loop: metrics, best-epoch selection, checkpoints per epoch."""

from __future__ import annotations

import copy
import csv
import math
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.data.transforms import DeviceNormalize, Preprocessing
from finetune.errors import TrainingError
from finetune.run.checkpoint import CheckpointMeta, ModelSpec, load_checkpoint
from finetune.training.loop import (
    EpochResult,
    Event,
    Recorder,
    StepOutput,
    Training,
    TrainStep,
    evaluate,
    overfitting,
    train,
)

CPU = torch.device("cpu")
META = CheckpointMeta(
    model=ModelSpec("tiny", num_features=4),
    classes=("a", "b"),
    preprocessing=Preprocessing(8, (0.5,) * 3, (0.5,) * 3, 1.0, "bilinear"),
)


def _loader(x: torch.Tensor, y: torch.Tensor, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=shuffle)


def _training(model: nn.Module, x, y, epochs: int, lr: float = 0.5, **options) -> Training:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return Training(
        optimizer=optimizer,
        scheduler=options.pop("scheduler", None)
        or torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * 8),
        train_loader=_loader(x, y),
        val_loader=_loader(x[:32], y[:32]),
        epochs=epochs,
        device=CPU,
        **options,
    )


def test_loop_learns_records_every_epoch_and_keeps_the_best(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long()  # learnable from one feature
    model = nn.Linear(5, 2)
    seen = []
    history = train(
        model,
        _training(model, x, y, epochs=4),
        Recorder(tmp_path, META),
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

    def record(self, result, model, resume_state=None, **kwargs) -> None:
        assert all(torch.isfinite(t).all() for t in model.state_dict().values())
        assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss)
        super().record(result, model, resume_state, **kwargs)


def _fit(run_dir: Path, epochs: int = 4, **poison):
    torch.manual_seed(0)
    model = _Poisoned(**poison)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long()
    run_dir.mkdir()
    training = _training(model, x, y, epochs)
    history = train(model, training, _CheckingRecorder(run_dir, META), progress=False)
    return history, training.optimizer


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


@pytest.mark.parametrize(("sync_every", "calls"), [(2, 8 + 4 + 8), (20, 8 + 8 + 8)])
def test_a_nan_is_caught_at_the_next_flag_read_and_the_epoch_restarts(
    tmp_path: Path, sync_every: int, calls: int
) -> None:
    # 8 batches an epoch; batch 3 of epoch 2 (training forward call 11) gives NaN. Reading the
    # flags every 2 steps drops the epoch after its batch 4; every 20, at the epoch's end.
    torch.manual_seed(0)
    model = _Poisoned(poison={11})
    x, y = _separable()
    training = _training(model, x, y, epochs=2, sync_every=sync_every)
    with pytest.warns(UserWarning, match=r"retry 1/3"):
        history = train(model, training, _CheckingRecorder(tmp_path, META), progress=False)
    assert model.calls == calls
    assert [r.epoch for r in history] == [1, 2] and history[-1].val_acc > 0.9


def test_evaluation_runs_in_the_layout_and_number_format_asked_for() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2))  # fmt: skip
    x, y = torch.randn(32, 3, 12, 12), torch.randint(0, 2, (32,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with torch.no_grad():
        logits = model(x)
    expected = torch.nn.functional.cross_entropy(logits, y).item()
    loss, acc = evaluate(model, loader, CPU)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    model.to(memory_format=torch.channels_last)
    nhwc, _ = evaluate(model, loader, CPU, channels_last=True)
    assert nhwc == pytest.approx(expected, rel=1e-4)
    bf16, _ = evaluate(model, loader, CPU, amp=torch.bfloat16)
    assert bf16 != expected and bf16 == pytest.approx(expected, rel=0.05)  # rounded, close


def _separable(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=generator)
    return x, (x[:, 0] > 0).long()


def test_the_moving_average_differs_from_the_raw_weights_and_is_evaluated_and_saved(
    tmp_path: Path,
) -> None:
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    x, y = _separable()
    model = nn.Linear(5, 2)
    ema = ModelEmaV3(model, decay=0.9, use_warmup=True)
    history = train(
        model, _training(model, x, y, epochs=3, ema=ema), Recorder(tmp_path, META),
        progress=False,
    )  # fmt: skip
    raw, averaged = model.state_dict(), ema.module.state_dict()
    assert not torch.allclose(raw["weight"], averaged["weight"])
    # What metrics.csv says about the average is the average evaluated, not the raw weights.
    loss, acc = evaluate(ema.module, _loader(x[:32], y[:32]), CPU)
    assert history[-1].ema_val_acc == acc and history[-1].ema_val_loss == pytest.approx(loss)
    assert history[-1].ema_val_loss != pytest.approx(history[-1].val_loss)
    saved = load_checkpoint(tmp_path / "ema.pt")
    best_ema = [r for r in history if r.ema_best][-1]
    assert saved["epoch"] == best_ema.epoch and saved["weights"] == "ema"
    if best_ema.epoch == 3:
        assert torch.equal(saved["state_dict"]["weight"], averaged["weight"])
    last = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(last["ema_state_dict"]["weight"], averaged["weight"])
    assert torch.equal(last["state_dict"]["weight"], raw["weight"])


def test_the_average_follows_the_weights_at_the_timm_warmed_up_rate() -> None:
    from timm.utils import ModelEmaV3

    model = nn.Linear(1, 1, bias=False)
    ema = ModelEmaV3(model, decay=0.9998, use_warmup=True)
    values = []
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.update(model, step=step)
        values.append(ema.module.weight.item())
    assert values[0] == 1.0  # the first update copies the weights
    expected = 1.0
    for step, value in zip(range(2, 6), values[1:], strict=True):
        decay = 1 - (1 + (step - 1)) ** (-2 / 3)
        expected = decay * expected + (1 - decay) * step
        assert value == pytest.approx(expected, rel=1e-5)


def test_snapshots_are_written_after_the_epochs_asked_for(tmp_path: Path) -> None:
    x, y = _separable()
    model = nn.Linear(5, 2)
    train(
        model, _training(model, x, y, epochs=4, snapshot_epochs=(2, 4)),
        Recorder(tmp_path, META), progress=False,
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("snapshot-*.pt")) == [
        "snapshot-1.pt", "snapshot-2.pt"]  # fmt: skip
    assert load_checkpoint(tmp_path / "snapshot-1.pt")["epoch"] == 2
    assert load_checkpoint(tmp_path / "snapshot-2.pt")["snapshot"] == 2


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path: Path) -> None:
    x, y = _separable()
    model = nn.Linear(5, 2)
    said: list[str] = []
    # lr 0: the weights never move, so nothing improves after epoch 1.
    history = train(
        model, _training(model, x, y, epochs=10, lr=0.0, patience=2, say=said.append),
        Recorder(tmp_path, META), progress=False,
    )  # fmt: skip
    assert [r.epoch for r in history] == [1, 2, 3]
    assert said and "early stop" in said[0] and "since epoch 1" in said[0]
    assert load_checkpoint(tmp_path / "last.pt")["stopped_early"] == 3


def test_label_smoothing_reaches_the_loss(tmp_path: Path) -> None:
    x, y = _separable()
    losses = []
    for i, smoothing in enumerate((0.0, 0.4)):
        torch.manual_seed(0)
        model = nn.Linear(5, 2)
        training = _training(model, x, y, epochs=1, label_smoothing=smoothing)
        (tmp_path / str(i)).mkdir()
        losses.append(train(model, training, Recorder(tmp_path / str(i), META),
                            progress=False)[0].train_loss)  # fmt: skip
    assert losses[1] > losses[0]  # smoothed targets cannot be fitted as closely


def _row(epoch: int, train_acc: float, val_acc: float, best: bool) -> EpochResult:
    return EpochResult(epoch, 0.0, train_acc, 0.0, val_acc, 0.1, 1.0, best, train_acc - val_acc)


def test_overfitting_is_flagged_only_when_the_gap_grows_and_val_stalls() -> None:
    rising = [_row(1, 0.6, 0.55, True), _row(2, 0.7, 0.6, True)]
    overfit = [*rising, _row(3, 0.8, 0.6, False), _row(4, 0.9, 0.58, False),
               _row(5, 0.97, 0.59, False)]  # fmt: skip
    message = overfitting(overfit)
    assert message and "epoch 5" in message and "+0.100 to +0.380" in message
    assert "best 0.600 at epoch 2" in message
    assert overfitting(overfit[:4]) is None  # only 2 epochs without a better val acc
    still_improving = [*overfit[:4], _row(5, 0.97, 0.7, True)]
    assert overfitting(still_improving) is None
    flat_gap = [_row(1, 0.9, 0.6, True), *(_row(e, 0.9, 0.6, False) for e in (2, 3, 4))]
    assert overfitting(flat_gap) is None  # a constant gap is not a growing one
    catching_up = [_row(1, 0.8, 0.95, True), *(_row(e, 0.8 + e / 100, 0.94, False)
                                               for e in (2, 3, 4))]  # fmt: skip
    assert overfitting(catching_up) is None  # grew, but train is still below val


def test_a_model_memorising_random_labels_gets_the_overfitting_warning(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 40)
    y = torch.randint(0, 2, (64,))  # nothing to learn: val stays at chance
    model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    training = Training(
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        train_loader=_loader(x[:48], y[:48], shuffle=True),
        val_loader=_loader(x[48:], y[48:]),
        epochs=12,
        device=CPU,
    )
    with pytest.warns(UserWarning, match="overfitting") as caught:
        history = train(model, training, Recorder(tmp_path, META), progress=False)
    assert len([w for w in caught if "overfitting" in str(w.message)]) == 1  # warned once
    assert history[-1].gap > 0.3
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert float(rows[-1]["gap"]) == pytest.approx(history[-1].gap)


def test_the_epochs_train_through_the_shared_step_with_the_runs_loss(tmp_path: Path) -> None:
    # The loop's losses and weights are exactly those of TrainStep driven by hand over the same
    # batches: one step function, the class weights and label smoothing reaching its loss.
    x, y = _separable()
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    twin = copy.deepcopy(model)
    loss = {"class_weights": torch.tensor([0.3, 3.0]), "label_smoothing": 0.1}
    history = train(
        model, _training(model, x, y, epochs=1, **loss), Recorder(tmp_path, META), progress=False
    )
    by_hand = _training(twin, x, y, epochs=1)
    step = TrainStep(twin, by_hand.optimizer, CPU, scheduler=by_hand.scheduler, **loss)
    sums = [step(images, labels).loss.item() * len(labels)
            for images, labels in step.batches(by_hand.train_loader)]  # fmt: skip
    assert history[0].train_loss == pytest.approx(sum(sums) / len(x), rel=1e-6)
    assert torch.equal(model.weight, twin.weight) and step.steps == 8
    plain, weighted = (
        TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.1), CPU, **options)(x[:8], y[:8]).loss
        for m, options in ((copy.deepcopy(model), {}), (copy.deepcopy(model), loss))
    )
    assert plain.item() != pytest.approx(weighted.item(), rel=1e-3)


def test_step_hooks_see_every_step_in_order_and_can_ask_to_stop() -> None:
    seen: list[tuple[Event, float | None, float]] = []
    model = nn.Linear(5, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def hook(event: Event, step: TrainStep, out: StepOutput | None) -> bool:
        if event is Event.BEFORE_STEP:
            step.optimizer.param_groups[0]["lr"] = 0.5  # what the step then uses
        seen.append((event, None if out is None else out.loss.item(), step.steps))
        return event is Event.AFTER_STEP and step.steps == 2

    step = TrainStep(model, optimizer, CPU, hooks=(hook,))
    x, y = _separable(16)
    outs = [step(x[i : i + 8], y[i : i + 8]) for i in (0, 8)]
    assert [e for e, _, _ in seen] == [Event.BEFORE_STEP, Event.AFTER_STEP] * 2
    assert [n for _, _, n in seen] == [0, 1, 1, 2]
    assert seen[1][1] == outs[0].loss.item() and outs[0].lr == 0.5
    assert step.stopped and bool(step.finite)
    with pytest.raises(AttributeError):
        Event.BEFOR_STEP  # noqa: B018 - a misspelt event fails loudly


def test_a_non_finite_loss_is_remembered_by_the_step_without_stopping_it() -> None:
    model = _Poisoned(poison={1})
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), CPU)
    x, y = _separable(8)
    assert not torch.isfinite(step(x, y).loss) and not bool(step.finite)
    step(x, y)  # the driver decides what a non-finite loss means: the step goes on
    assert step.steps == 2 and not bool(step.finite) and not step.stopped


class _InfiniteOnValidation(nn.Module):
    """Finite weights, finite training losses, infinite logits in eval mode: what an LR far too
    high gave (``--lr 1e30``), whose NaN validation loss became best.pt."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if self.training else out * float("inf")


def test_a_non_finite_validation_loss_is_never_best_and_no_missing_checkpoint_is_named(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = _InfiniteOnValidation()
    x, y = _separable()
    training = _training(model, x, y, epochs=2)
    with (
        pytest.warns(UserWarning, match=r"\(training or validation\) became non-finite"),
        pytest.raises(TrainingError, match="in epoch 1 ") as info,
    ):
        train(model, training, Recorder(tmp_path, META), progress=False)
    message = str(info.value)
    assert "no epoch finished with finite losses, so no checkpoint was written" in message
    assert "last.pt" not in message and "lower --lr" in message
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "last.pt").exists()
    # A NaN loss never beats a finite one, nor is the first "best", whatever its accuracy.
    recorder = Recorder(tmp_path / "r", META)
    assert not recorder.is_best(1.0, math.nan) and not recorder.is_ema_best(1.0, math.inf)
    assert recorder.is_best(0.5, 0.7)


class _Exhausting(nn.Module):
    """A model whose forward pass fails as running out of memory does, in each of its forms."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.linear, self.error = nn.Linear(3, 2), error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 192000000000 bytes."
        ),
        MemoryError(),
    ],
)
def test_running_out_of_memory_in_a_step_names_the_options_to_lower(error) -> None:
    model = _Exhausting(error)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), CPU)
    images, labels = torch.zeros(4, 3, 40, 48), torch.zeros(4, dtype=torch.long)
    with pytest.raises(TrainingError) as info:
        step(images, labels)
    message = str(info.value)
    assert "Out of memory on cpu in a training step of 4 images of 40x48 px" in message
    assert "--batch-size (this step had 4)" in message and "--image-size" in message
    assert info.value.__cause__ is error  # the original stays reachable for a debugger
    # Other errors are bugs, and keep their type and traceback.
    other = _Exhausting(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes"):
        TrainStep(other, torch.optim.SGD(other.parameters(), lr=0.1), CPU)(images, labels)


def test_uint8_batches_are_normalised_on_the_device_before_the_model() -> None:
    """The training loaders ship uint8 images; training and evaluation see exactly what a
    float pipeline would have given, and uint8 never reaches a model un-normalised."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    raw = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 2, (16,))
    normalize = DeviceNormalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    floats = normalize(raw)
    want = evaluate(model, _loader(floats, y), CPU)
    assert evaluate(model, _loader(raw, y), CPU, normalize=normalize) == pytest.approx(want)
    with pytest.raises(TypeError, match="uint8 images reached the model"):
        evaluate(model, _loader(raw, y), CPU)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    step_a = TrainStep(a, torch.optim.SGD(a.parameters(), lr=0.1), CPU, channels_last=True)
    step_b = TrainStep(
        b, torch.optim.SGD(b.parameters(), lr=0.1), CPU, channels_last=True, normalize=normalize
    )
    batches = zip(step_a.batches(_loader(floats, y)), step_b.batches(_loader(raw, y)), strict=True)
    for (xa, ya), (xb, yb) in batches:
        assert xb.dtype == torch.float32 and xb.is_contiguous(memory_format=torch.channels_last)
        assert step_a(xa, ya).loss.item() == pytest.approx(step_b(xb, yb).loss.item(), abs=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_an_fp16_step_scales_the_loss_and_skips_a_step_whose_gradients_overflowed() -> None:
    """fp16 training (T4, V100): the gradient scaler multiplies the loss before backward; a
    step whose float16 gradients overflowed leaves the weights alone and halves the scale
    (without PyTorch's warning about the scheduler); later steps train as fp32 would."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    model = nn.Linear(5, 2)
    fp32 = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # float16 gradients overflow
    step = TrainStep(model, optimizer, CPU, amp=torch.float16, scaler=scaler, scheduler=scheduler)
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        out = step(x, y)
    assert not [w for w in said if "lr_scheduler" in str(w.message)]
    assert math.isfinite(out.loss.item())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # skipped
    assert scaler.get_scale() == 2.0**99
    scaler.update(2.0**10)  # a scale whose gradients fit in float16
    step(x, y)
    TrainStep(fp32, torch.optim.SGD(fp32.parameters(), lr=0.1), CPU)(x, y)
    for a, b in zip(model.parameters(), fp32.parameters(), strict=True):
        assert not torch.equal(a, before["weight"] if a.ndim == 2 else before["bias"])
        assert torch.allclose(a, b, atol=1e-3)  # float16's rounding, no more


def test_an_fp16_run_saves_the_scale_it_reached_and_restores_it(tmp_path: Path) -> None:
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(5, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # halves at each overflow
    training = _training(model, x, y, epochs=4, amp=torch.float16, scaler=scaler)
    history = train(model, training, Recorder(tmp_path, META), progress=False)
    assert history[-1].val_acc > 0.8  # it learned once the scale came down
    reached = scaler.get_scale()
    assert reached < 2.0**24
    saved = load_checkpoint(tmp_path / "last.pt")["scaler"]
    assert saved["scale"] == reached
    again = torch.amp.GradScaler("cpu")
    again.load_state_dict(saved)  # what resume does (strategies.finetune)
    assert again.get_scale() == reached


class _Slow(nn.Linear):
    """A linear model whose every training forward sleeps ``pause`` seconds, and ``slower``
    times that from the ``from_call``-th on: another process taking the CPU mid-run."""

    def __init__(self, pause: float, slower: float = 1.0, from_call: int = 10**9) -> None:
        super().__init__(5, 2)
        self.pause, self.slower, self.from_call, self.calls = pause, slower, from_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            time.sleep(self.pause * (self.slower if self.calls >= self.from_call else 1.0))
        return super().forward(x)


def test_a_budget_plans_the_epochs_left_again_when_they_slow_down(tmp_path: Path) -> None:
    x, y = _separable()
    # 8 steps of 0.02 s per epoch (~0.17 s), 4x slower from epoch 3 on; 0.9 s of budget: the
    # 20 planned epochs do not fit, and after the slowdown fewer than planned after epoch 1.
    model = _Slow(0.02, slower=4.0, from_call=17)
    said: list[str] = []
    horizons: list[int] = []
    start = time.perf_counter()
    history = train(
        model, _training(model, x, y, epochs=20, say=said.append, deadline=start + 0.9,
                         replan=horizons.append, sync_every=1),
        Recorder(tmp_path, META), progress=False,
    )  # fmt: skip
    ended = time.perf_counter()
    assert 2 <= len(history) < 20
    assert horizons and horizons == sorted(horizons, reverse=True)  # shortened, never longer
    assert any(m.startswith("budget    epochs take ~") for m in said), said
    # Training ends by the deadline, give or take one step and the last validation.
    assert ended - start < 0.9 + 0.2, (ended - start, said)
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == len(history) and (tmp_path / "best.pt").is_file()


def test_an_epoch_running_at_the_deadline_is_cut_validated_and_recorded(tmp_path: Path) -> None:
    x, y = _separable()
    model = _Slow(0.05)  # 8 steps of 0.05 s: 0.4 s per epoch
    said: list[str] = []
    start = time.perf_counter()
    history = train(
        model, _training(model, x, y, epochs=5, say=said.append, deadline=start + 0.12,
                         sync_every=1),
        Recorder(tmp_path, META), progress=False,
    )  # fmt: skip
    assert [r.epoch for r in history] == [1]
    assert any(m.startswith("budget    epoch 1 cut at batch") for m in said), said
    assert time.perf_counter() - start < 0.4  # not the whole epoch
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
