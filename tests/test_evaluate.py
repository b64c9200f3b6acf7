"""``evaluate`` on a labelled folder: metrics that agree with the predictions, and real plots;
images that cannot be read are left out and listed."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import finetune
from finetune.cli.commands import SKIPPED_EXIT, cli
from finetune.errors import DataError
from finetune.inference.evaluate import evaluate
from finetune.inference.inputs import Skipped
from finetune.inference.predict import expand_inputs

from .test_predict import unreadable_images


@pytest.fixture(scope="module")
def predictor(linear_run: finetune.FitResult) -> finetune.Predictor:
    return finetune.load(linear_run.dir, device="cpu")


def test_metrics_agree_with_the_predictions(predictor: finetune.Predictor, fashion: Path) -> None:
    result = predictor.evaluate(fashion / "test", top_k=3)
    images = expand_inputs([fashion / "test"])
    predictions = predictor.predict(images)
    right = [p.label == Path(p.path).parent.name for p in predictions]
    assert len(result.labels) == len(images) == 100
    assert result.accuracy == pytest.approx(np.mean(right)) and result.accuracy > 0.6
    assert result.accuracy <= result.top_k_accuracy <= 1.0
    everything = evaluate(predictor, fashion / "test", top_k=len(predictor.classes))
    assert everything.top_k_accuracy == 1.0

    confusion = result.confusion()
    assert confusion.sum() == 100 and np.trace(confusion) == sum(right)
    per_class = result.per_class()
    for i, name in enumerate(predictor.classes):
        assert per_class[name]["support"] == confusion[i].sum() == 10
        assert per_class[name]["recall"] == pytest.approx(confusion[i, i] / 10)
        predicted = confusion[:, i].sum()
        if predicted:
            assert per_class[name]["precision"] == pytest.approx(confusion[i, i] / predicted)

    mistakes = result.mistakes(limit=100)
    assert len(mistakes) == 100 - sum(right)
    assert all(m.true != m.predicted for m in mistakes)
    probabilities = [m.probability for m in mistakes]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(m.true == m.path.parent.name for m in mistakes)


def test_save_writes_a_report_and_two_real_pngs(
    predictor: finetune.Predictor, fashion: Path, tmp_path: Path
) -> None:
    result = predictor.evaluate(fashion / "test")
    files = result.save(tmp_path / "eval")
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "confusion.png",
        "evaluation.json",
        "mistakes.png",
    ]
    for key in ("confusion", "mistakes"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(files[key]) as image:
            assert image.width >= 400 and image.height >= 300
    report = json.loads(files["json"].read_text())
    assert report["accuracy"] == result.accuracy
    assert report["confusion"] == result.confusion().tolist()
    assert len(report["most_confident_mistakes"]) == min(16, len(result.mistakes(100)))


def test_a_folder_with_some_classes_or_foreign_ones(
    predictor: finetune.Predictor, fashion: Path, tmp_path: Path
) -> None:
    subset = tmp_path / "subset"
    shutil.copytree(fashion / "test" / "bag", subset / "bag")
    result = predictor.evaluate(subset)
    assert len(result.labels) == 10 and result.per_class()["coat"]["support"] == 0
    shutil.copytree(fashion / "test" / "coat", subset / "cats")
    with pytest.raises(DataError, match="classes the model does not know: cats"):
        predictor.evaluate(subset)
    with pytest.raises(DataError, match="not a folder"):
        predictor.evaluate(tmp_path / "missing")
    (tmp_path / "empty" / "bag").mkdir(parents=True)
    with pytest.raises(DataError, match="no class sub-folders with images"):
        predictor.evaluate(tmp_path / "empty")


def test_unreadable_images_are_left_out_of_the_metrics_named_and_exit_3(
    predictor: finetune.Predictor,
    linear_run: finetune.FitResult,
    fashion: Path,
    tmp_path: Path,
) -> None:
    """A decompression bomb, a truncated, an empty and a text file named as images, and a
    folder named ``x.png``, among real images: the real ones are measured, the others listed
    with why (in the Evaluation and evaluation.json), and the command exits 3."""
    data = tmp_path / "labelled"
    shutil.copytree(fashion / "test" / "bag", data / "bag")
    shutil.copytree(fashion / "test" / "coat", data / "coat")
    bad = unreadable_images(data / "bag", fashion)
    (data / "coat" / "folder.png").mkdir()  # a folder, not an image: not one of the images
    skipped: list[Skipped] = []
    result = predictor.evaluate(data, on_skip=skipped.append)
    assert len(result.labels) == 20 and result.per_class()["bag"]["support"] == 10
    assert result.skipped == tuple(skipped)
    assert sorted(Path(s.path or "").name for s in skipped) == sorted(bad)
    assert all(s.reason for s in skipped)
    files = result.save(tmp_path / "eval")
    listed = json.loads(files["json"].read_text())["skipped"]
    assert {Path(s["path"]).name: s["reason"] for s in listed}["bomb.png"].startswith(
        "decompression bomb"
    )
    shown = warnings.showwarning
    try:
        command = CliRunner().invoke(
            cli, ["evaluate", str(linear_run.dir), str(data), "-o", str(tmp_path / "cli")]
        )
    finally:
        warnings.showwarning = shown
    assert command.exit_code == SKIPPED_EXIT, command.output
    assert "accuracy" in command.stdout and "Traceback" not in command.output
    for path in bad.values():
        assert f"skipped {path}: " in command.stderr
    # Nothing readable at all: a clear error that gives the reasons, not a traceback.
    only_bad = tmp_path / "only-bad"
    unreadable_images(only_bad / "bag", fashion)
    with pytest.raises(DataError, match=r"None of .* could be read; .*: (decompression|empty)"):
        predictor.evaluate(only_bad, on_skip=[].append)
