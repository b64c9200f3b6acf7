"""What finetune 0.1.0 wrote still loads and gives the same answers.

tests/fixtures/v0.1.0 was made with the code of commit 9efbb24 (before the stage-subpackage
layout) by tests/fixtures/make_v0_1_0.py: a run folder (best.pt and its JSON records), its three
exports, and the probabilities that version gave for four test images.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import finetune
from finetune.inference.formats import Format, detect_format

FIXTURES = Path(__file__).parent / "fixtures" / "v0.1.0"
# expected.json's name for each -> the fixture's path and what it is
MODELS = {
    "run": ("run", Format.RUN),
    "bundle": ("bundle", Format.BUNDLE),
    "torchscript": ("model.pt", Format.TORCHSCRIPT),
    "onnx": ("model.onnx", Format.ONNX),
}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def old(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the fixtures, so that no test can change the committed files."""
    copy = tmp_path_factory.mktemp("v0.1.0") / "v0.1.0"
    shutil.copytree(FIXTURES, copy)
    return copy


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIXTURES / "expected.json").read_text())


def _images(fashion: Path, expected: dict) -> list[Path]:
    return [fashion / p for p in expected["images"]]


@pytest.mark.parametrize("name", list(MODELS))
def test_old_models_load_and_give_the_old_probabilities(
    name: str, old: Path, expected: dict, fashion: Path
) -> None:
    relative, kind = MODELS[name]
    assert detect_format(old / relative) is kind
    predictor = finetune.load(old / relative, device="cpu")
    assert list(predictor.classes) == expected["classes"]
    probs = predictor.predict_proba(_images(fashion, expected))
    np.testing.assert_allclose(probs, expected["probabilities"][name], rtol=0, atol=TOLERANCE)


def test_an_old_run_exports_again_with_the_same_answers(
    old: Path, expected: dict, fashion: Path, tmp_path: Path
) -> None:
    bundle = finetune.export(old / "run", out=tmp_path / "bundle")
    probs = finetune.load(bundle, device="cpu").predict_proba(_images(fashion, expected))
    np.testing.assert_allclose(probs, expected["probabilities"]["run"], rtol=0, atol=TOLERANCE)


def _predict_json(model: Path, images: list[Path]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "finetune", "predict", str(model), *map(str, images)]
    command += ["--json", "--top-k", "3"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def test_finetune_predict_reads_every_old_model(old: Path, expected: dict, fashion: Path) -> None:
    images = _images(fashion, expected)
    paths = [old / relative for relative, _ in MODELS.values()]
    with ThreadPoolExecutor(len(paths)) as pool:
        results = list(pool.map(lambda p: _predict_json(p, images), paths))
    for name, result in zip(MODELS, results, strict=True):
        assert result.returncode == 0, (name, result.stderr[-2000:])
        rows = json.loads(result.stdout)
        assert [r["path"] for r in rows] == list(map(str, images))
        got = [{t["label"]: t["probability"] for t in r["top_k"]} for r in rows]
        probs = [[row[c] for c in expected["classes"]] for row in got]
        np.testing.assert_allclose(probs, expected["probabilities"][name], atol=TOLERANCE)
