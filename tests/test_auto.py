"""auto is never worse than its own probe (finetune.strategies.auto): when it fine-tunes, the
probe of the same row is fit first into baseline/, and best.pt holds the better of the two on
the same validation images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import finetune
from finetune.run.checkpoint import load_checkpoint
from finetune.run.layout import RunDir
from finetune.strategies.auto import Comparison, compare
from finetune.training.loop import EpochResult


def digit_parity(root: Path) -> Path:
    """scikit-learn's real 8x8 digits 0-3 as two classes, even and odd (about 360 images each:
    "a lot of data" for auto, so it fine-tunes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        if target > 3:
            continue
        folder = root / ("even" if target % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image / 16 * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def _epoch(epoch: int, val_acc: float, val_loss: float, best: bool) -> EpochResult:
    return EpochResult(epoch, 0.1, 0.9, val_loss, val_acc, 1e-3, 1.0, best)


def test_the_better_of_probe_and_fine_tune_is_kept_a_tie_going_to_the_probe() -> None:
    history = [_epoch(1, 0.80, 0.6, True), _epoch(2, 0.85, 0.5, True), _epoch(3, 0.84, 0.4, False)]
    won = compare(_epoch(1, 0.83, 0.5, True), history, "linear", "finetune-top")
    assert (won.kept, won.finetune_epoch, won.finetune_val_acc) == ("finetune", 2, 0.85)
    assert won.margin == pytest.approx(0.02) and "+2.0 points over the probe" in won.describe()
    lost = compare(_epoch(1, 0.90, 0.7, True), history, "linear", "finetune-top")
    assert lost.kept == "probe" and "the probe is 5.0 points better" in lost.describe()
    tie = compare(_epoch(1, 0.85, 0.5, True), history, "stage-probe", "finetune-all")
    assert tie.kept == "probe" and "as accurate" in tie.describe()
    assert compare(_epoch(1, 0.85, 0.51, True), history, "linear", "finetune-all").kept == (
        "finetune"
    )  # as accurate, at a higher val loss
    assert Comparison(**json.loads(json.dumps(won.to_dict()))) == won


def test_auto_fits_its_probe_first_and_keeps_it_when_the_fine_tune_scores_lower(
    tmp_path: Path,
) -> None:
    data = digit_parity(tmp_path / "digits")
    # One epoch at 32 px: a fine-tune far from done, which its probe beats.
    run = finetune.fit(
        data, epochs=1, image_size=32, out=str(tmp_path / "run"), verbose=False, report=False
    )
    assert run.strategy == "finetune-all" and run.decision is not None
    assert run.decision.baseline == "stage-probe" and run.decision.baseline_image_size == 32
    assert any("the fine-tune must beat it on val" in r for r in run.decision.reasons)
    comparison = run.comparison
    assert comparison is not None and comparison.kept == "probe"
    folder = RunDir(run.dir)
    probe = load_checkpoint(folder.baseline.best)
    assert probe["strategy"] == "stage-probe" and folder.baseline.probe.is_file()
    assert comparison.probe_val_acc == probe["metrics"]["val_acc"] > run.best.val_acc
    assert comparison.finetune_val_acc == run.best.val_acc and comparison.finetune_epoch == 1
    # best.pt is the probe's (plus the TTA record); the fine-tune's best epoch is kept aside.
    best = load_checkpoint(folder.best)
    assert best["strategy"] == "stage-probe" and best["model"]["stage"] is not None
    assert load_checkpoint(folder.finetune_best)["strategy"] == "finetune-all"
    assert run.best_metric == comparison.probe_val_acc
    # The probe was scored on the run's own validation images.
    split = json.loads(folder.split.read_text())
    predictor = finetune.load(run.dir)
    samples = [(data / rel, label) for rel, label, _ in split["val"]]
    probs = predictor.predict_proba([p for p, _ in samples], tta="none")
    labels = np.array([label for _, label in samples])
    assert np.mean(probs.argmax(1) == labels) == pytest.approx(comparison.probe_val_acc)
    assert json.loads(folder.decision.read_text())["kept"] == comparison.to_dict()
    page = finetune.report(run.dir, max_images=8).read_text()
    assert "auto kept</th><td>the stage-probe probe, val acc" in page

    # Continued for another epoch (config.json's epochs raised): the baseline is read back,
    # not fit again, and whichever is better stays in best.pt.
    config = json.loads(folder.config.read_text())
    folder.config.write_text(json.dumps({**config, "epochs": 2}))
    mtime = folder.baseline.best.stat().st_mtime_ns
    resumed = finetune.resume(run.dir, verbose=False, report=False)
    assert folder.baseline.best.stat().st_mtime_ns == mtime
    again = resumed.comparison
    assert again is not None and again.probe_val_acc == comparison.probe_val_acc
    kept_strategy = "stage-probe" if again.kept == "probe" else "finetune-all"
    assert load_checkpoint(folder.best)["strategy"] == kept_strategy
    if again.kept == "probe":  # the fine-tune's best, of either epoch, kept aside
        aside = load_checkpoint(folder.finetune_best)
        assert aside["strategy"] == "finetune-all"
        assert aside["metrics"]["val_acc"] == again.finetune_val_acc
    else:
        assert not folder.finetune_best.exists()


def test_no_baseline_for_a_strategy_the_user_chose(tmp_path: Path) -> None:
    data = digit_parity(tmp_path / "digits")
    fixed = finetune.fit(
        data, strategy="finetune-all", epochs=1, image_size=32, out=str(tmp_path / "fixed"),
        verbose=False, report=False, tta="none",
    )  # fmt: skip
    assert fixed.comparison is None and not RunDir(fixed.dir).baseline.path.exists()
    assert not math.isnan(fixed.best_metric) and fixed.best_metric == fixed.best.val_acc
