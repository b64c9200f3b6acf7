"""``evaluate`` on a labelled folder: metrics that agree with the predictions, and real plots."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import finetune
from finetune.errors import DataError
from finetune.inference.evaluate import evaluate
from finetune.inference.predict import expand_inputs


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
