"""Test-time augmentation chosen on val (finetune.inference.tta): scored at the end of fit,
kept in best.pt and its exports, used by predict and evaluate under --tta auto."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune
from finetune.errors import CheckpointError, ConfigError
from finetune.inference.predict import Predictor, expand_inputs
from finetune.inference.tta import MODE_VIEWS, VIEW_NAMES, TTAChoice, choose, score_tta
from finetune.run.checkpoint import add_to_checkpoint

from .conftest import copy_classes
from .test_cli import invoke

FIXTURES = Path(__file__).parent / "fixtures"


def _val(run: finetune.FitResult) -> list[tuple[Path, int]]:
    split = json.loads((run.dir / "split.json").read_text())
    return [(Path(split["root"]) / rel, label) for rel, label, _ in split["val"]]


def test_fit_scores_the_three_modes_keeps_the_best_and_predict_uses_it(
    linear_run: finetune.FitResult,
) -> None:
    samples = _val(linear_run)
    labels = np.array([label for _, label in samples])
    predictor = finetune.load(linear_run.dir)
    record = linear_run.tta
    assert record is not None and not record.fixed and record.images == record.of == len(samples)
    # One pass of ten views gives each mode's accuracy exactly as predicting with that mode.
    correct = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the modes that lost say so; measured below
        for mode in MODE_VIEWS:
            probs = predictor.predict_proba([p for p, _ in samples], tta=mode)
            correct[mode] = probs.argmax(1) == labels
            assert record.accuracy[mode] == pytest.approx(np.mean(correct[mode]))
    assert record.views["centre"] == record.accuracy["none"]
    assert set(record.views) == set(VIEW_NAMES)
    assert (record.chosen, record.why) == choose(correct)
    # best.pt and tta.json hold the choice; predict's and evaluate's auto resolve to it.
    saved = torch.load(linear_run.best_checkpoint, weights_only=True)["tta"]
    assert TTAChoice.from_dict(saved) == record == predictor.tta
    on_disk = json.loads(linear_run.run.tta.read_text())
    assert on_disk["chosen"] == on_disk["tta"] == record.chosen
    assert on_disk["val_acc"] == record.accuracy[record.chosen] == linear_run.tta_val_acc
    assert predictor.resolve_tta("auto") == record.chosen
    chosen = predictor.predict_proba([p for p, _ in samples[:8]], tta=record.chosen)
    assert predictor.predict_proba([p for p, _ in samples[:8]]) == pytest.approx(chosen)


def _right(*runs: tuple[bool, int]) -> np.ndarray:
    return np.concatenate([np.full(n, value) for value, n in runs])


def test_the_most_accurate_mode_is_chosen_a_tie_going_to_fewer_views() -> None:
    base = _right((True, 80), (False, 20))
    one = base.copy()
    one[80] = True  # one image in a hundred better: chosen, and said to be possibly chance
    chosen, why = choose({"none": base, "flip": one, "10crop": base})
    assert chosen == "flip"
    assert why == (
        "the most accurate: right on 1 val image where none was wrong, wrong on 0 val images "
        "where none was right; sign test p = 0.50: could be chance"
    )
    five = base.copy()
    five[80:85] = True  # five of five: p = 1/32
    chosen, why = choose({"none": base, "flip": one, "10crop": five})
    assert chosen == "10crop" and why.endswith("sign test p = 0.03")
    assert choose({"none": base, "flip": base, "10crop": base})[0] == "none"  # a tie: fewest
    assert choose({"none": base, "flip": five, "10crop": five})[0] == "flip"
    # The case: corner crops wrong on many images the centre got right.
    hurt = _right((True, 52), (False, 48))
    assert choose({"none": base, "flip": base, "10crop": hurt}) == (
        "none", "the most accurate, or as accurate with fewer views"
    )  # fmt: skip


def _hurt_by_crops(chosen: str = "none", fixed: bool = False) -> TTAChoice:
    """The issue's case: corner crops hurt a probe on data whose signal sits near the edges."""
    views = dict.fromkeys(VIEW_NAMES, 0.6) | {"centre": 0.81, "centre mirrored": 0.8}
    accuracy = {"none": 0.832, "flip": 0.82, "10crop": 0.518}
    return TTAChoice(chosen, "test", accuracy, views, 500, 500, fixed)


def test_an_explicit_mode_that_scored_below_the_choice_is_warned_with_the_numbers(
    linear_run: finetune.FitResult, fashion: Path
) -> None:
    loaded = finetune.load(linear_run.dir, device="cpu")
    predictor = Predictor(
        loaded.model, loaded.classes, loaded.preprocessing, "cpu", source="run/best.pt",
        tta=_hurt_by_crops(),
    )  # fmt: skip
    paths = expand_inputs([fashion / "test" / "bag"])[:3]
    with pytest.warns(UserWarning, match=r"--tta 10crop scored 0\.518 .* against 0\.832 with none"):
        predictor.predict(paths, tta="10crop")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto, and the chosen mode asked for by name: silent
        auto = predictor.predict_proba(paths)
        assert auto == pytest.approx(predictor.predict_proba(paths, tta="none"))
    # In an ensemble each member that recorded a better mode says so.
    ensemble = finetune.Ensemble([predictor, loaded])
    with pytest.warns(UserWarning, match=r"run/best\.pt: --tta 10crop scored 0\.518"):
        ensemble.predict_proba(paths, tta="10crop")
    # A mode the user fixed when fitting is kept, and the warning says so.
    fixed = _hurt_by_crops("10crop", fixed=True)
    assert "the run keeps 10crop, as fit --tta 10crop fixed it" in (fixed.hurts("flip") or "")
    assert fixed.hurts("none") is None  # the best scores warn of nothing
    assert _hurt_by_crops().hurts("flip") is not None  # below the choice: said
    better = TTAChoice("none", "test", {"none": 0.8, "flip": 0.81, "10crop": 0.8}, {}, 100, 100)
    assert better.hurts("flip") is None  # above the choice (within chance): nothing to warn of


def test_a_seeded_sample_is_scored_beyond_the_limit(linear_run: finetune.FitResult) -> None:
    predictor = finetune.load(linear_run.dir)
    samples = _val(linear_run)
    first = score_tta(predictor, samples, limit=10, seed=3)
    assert (first.images, first.of) == (10, len(samples))
    assert "on 10 of 100 val images" in first.describe()
    assert score_tta(predictor, samples, limit=10, seed=3) == first  # the same sample again


def test_models_without_a_record_predict_as_before(tmp_path: Path) -> None:
    old = finetune.load(FIXTURES / "v0.1.0" / "run")  # written before the record existed
    assert old.tta is None and old.resolve_tta("auto") == "none"
    with pytest.raises(ConfigError, match="choose auto or one of none, flip, 10crop"):
        old.resolve_tta("5crop")
    # fit --tta none: nothing scored, nothing recorded, auto predicts with the centre crop.
    data = copy_classes(tmp_path / "data", ["bag", "sneaker", "trouser"], 10)
    run = finetune.fit(data, strategy="linear", image_size=32, tta="none", out=str(tmp_path / "r"),
                       verbose=False, report=False)  # fmt: skip
    assert run.tta is None and not run.run.tta.exists()
    assert "tta" not in torch.load(run.best_checkpoint, weights_only=True)
    assert finetune.load(run.dir).resolve_tta("auto") == "none"


def test_a_malformed_record_is_refused_naming_the_file() -> None:
    with pytest.raises(CheckpointError, match=r"x\.pt records the test-time augmentation '5crop'"):
        TTAChoice.from_dict({"chosen": "5crop"}, "x.pt")
    with pytest.raises(CheckpointError, match=r"in x\.pt is malformed"):
        TTAChoice.from_dict({"chosen": "none", "accuracy": [1, 2]}, "x.pt")
    assert TTAChoice.from_dict(None) is None


def test_every_export_carries_the_choice(linear_run: finetune.FitResult, tmp_path: Path) -> None:
    for fmt, name in (("safetensors", "bundle"), ("torchscript", "model.pt"), ("onnx", "m.onnx")):
        path = finetune.export(linear_run.dir, format=fmt, out=tmp_path / name)
        assert finetune.load(path).tta == linear_run.tta, fmt


def test_evaluate_uses_the_choice_and_warns_of_a_worse_explicit_mode(
    linear_run: finetune.FitResult, fashion: Path, tmp_path: Path
) -> None:
    record = linear_run.tta
    assert record is not None
    auto = invoke("evaluate", str(linear_run.dir), str(fashion / "test"), "--json")
    assert auto.exit_code == 0, auto.output
    assert json.loads(auto.stdout)["tta"] == record.chosen
    # A checkpoint whose record says corner crops hurt: the command reads it from the file.
    checkpoint = tmp_path / "hurt.pt"
    shutil.copy(linear_run.best_checkpoint, checkpoint)
    add_to_checkpoint(checkpoint, tta=_hurt_by_crops().to_dict())
    test = str(fashion / "test")
    auto = invoke("evaluate", str(checkpoint), test, "-o", str(tmp_path / "e1"), "--json")
    assert auto.exit_code == 0 and json.loads(auto.stdout)["tta"] == "none"
    assert "scored" not in auto.stderr
    worse = invoke("evaluate", str(checkpoint), test, "-o", str(tmp_path / "e2"), "--tta", "10crop")
    assert worse.exit_code == 0, worse.output
    assert (
        f"{checkpoint}: --tta 10crop scored 0.518 on the validation images against 0.832 with "
        "none (accuracy on 500 images when fit scored the modes); --tta auto uses none."
    ) in worse.stderr
    assert "with tta 10crop" in worse.stdout
