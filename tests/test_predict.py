"""``finetune.load`` and the Predictor on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
from finetune.errors import DataError
from finetune.predict import expand_inputs


@pytest.fixture(scope="module")
def predictor(linear_run: finetune.FitResult) -> finetune.Predictor:
    return finetune.load(linear_run.dir, device="cpu")


def test_predictions_agree_with_the_validation_metric(
    predictor: finetune.Predictor, linear_run: finetune.FitResult, fashion: Path
) -> None:
    """Predict preprocesses exactly as training evaluated: same accuracy on val/."""
    paths = expand_inputs([fashion / "val"])
    predictions = predictor.predict(paths)
    correct = sum(Path(p.path).parent.name == p.label for p in predictions)
    assert len(predictions) == 100
    assert correct / 100 == pytest.approx(linear_run.best_metric)


def test_held_out_test_images_are_mostly_right(predictor: finetune.Predictor, fashion: Path):
    predictions = predictor.predict(expand_inputs([fashion / "test"]))
    accuracy = np.mean([Path(p.path).parent.name == p.label for p in predictions])
    assert accuracy > 0.5  # chance is 0.1


def test_paths_pil_images_and_arrays_give_the_same_answer(
    predictor: finetune.Predictor, fashion: Path
) -> None:
    path = sorted((fashion / "test" / "trouser").glob("*.png"))[0]
    grey = Image.open(path)
    from_path, from_pil, from_array, from_grey_array = (
        predictor.predict(x)[0] for x in (path, grey, np.array(grey.convert("RGB")), np.array(grey))
    )
    assert from_path.path == str(path) and from_pil.path is None
    assert from_path.label == from_pil.label == from_array.label == from_grey_array.label
    assert from_path.probability == pytest.approx(from_array.probability, abs=1e-6)


def test_top_k_is_sorted_and_bounded(predictor: finetune.Predictor, fashion: Path) -> None:
    path = next((fashion / "test" / "bag").glob("*.png"))
    (prediction,) = predictor.predict(path, top_k=50)
    probs = [p for _, p in prediction.top_k]
    assert len(prediction.top_k) == 10 and probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert (prediction.label, prediction.probability) == prediction.top_k[0]
    assert prediction.to_dict()["top_k"][0] == {"label": prediction.label, "probability": probs[0]}


def test_inputs_expand_recursively_and_missing_paths_fail(tmp_path: Path, fashion: Path):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    source = next((fashion / "test" / "coat").glob("*.png"))
    (nested / "x.png").write_bytes(source.read_bytes())
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "y.png").write_bytes(source.read_bytes())
    (tmp_path / "notes.txt").write_text("no")
    assert expand_inputs([tmp_path]) == [nested / "x.png"]
    with pytest.raises(DataError, match="does not exist"):
        expand_inputs([tmp_path / "nope.png"])


def test_unreadable_images_are_skipped_with_a_warning(
    predictor: finetune.Predictor, tmp_path: Path, fashion: Path
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    good = next((fashion / "test" / "coat").glob("*.png"))
    with pytest.warns(UserWarning, match="bad.png"):
        predictions = predictor.predict([bad, good])
    assert [p.path for p in predictions] == [str(good)]


def test_tta_averages_the_softmax_of_the_views(predictor: finetune.Predictor, fashion: Path):
    paths = sorted((fashion / "test" / "sandal").glob("*.png"))[:6]
    # 76 x 73: the short side is already the evaluation resize (64 / 0.875), and the centre
    # crop leaves 6 columns on each side, so cropping and mirroring commute exactly.
    arrays = [np.array(Image.open(p).convert("RGB").resize((76, 73))) for p in paths]
    plain = predictor.predict_proba(arrays)
    mirrored = predictor.predict_proba([a[:, ::-1].copy() for a in arrays])
    flip = predictor.predict_proba(arrays, tta="flip")
    assert flip == pytest.approx((plain + mirrored) / 2, abs=1e-5)
    # 10 crops: the average of the ten views, each classified on its own.
    views = predictor.views("10crop")
    crops = [np.ascontiguousarray(c) for c in views.crops(arrays[0])]
    model = predictor.model
    with torch.inference_mode():
        each = model(torch.stack([views.to_tensor(c) for c in crops])).softmax(1).numpy()
    ten = predictor.predict_proba(arrays[:1], tta="10crop")[0]
    assert ten == pytest.approx(each.mean(0), abs=1e-5)
    assert not np.allclose(ten, plain[0], atol=1e-3)  # the views really differ
    # batch_size counts images, whatever the number of views.
    assert predictor.predict_proba(paths, batch_size=4, tta="10crop") == pytest.approx(
        predictor.predict_proba(paths, batch_size=32, tta="10crop"), abs=1e-5
    )
    labels = [p.label for p in predictor.predict(paths, tta="10crop")]
    assert len(labels) == 6
