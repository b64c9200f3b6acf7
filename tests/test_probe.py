"""Linear probes: logistic regression with C chosen by cross-validation, folded into nn.Linear."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from finetune.strategies.logistic import C_GRID, fit_probe


def test_probe_on_real_digits_chooses_c_by_cv_and_folds_into_a_linear_layer() -> None:
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    result = fit_probe(x[:1200], y[:1200], 10)
    assert set(result.cv_by_C) == set(C_GRID)
    assert result.cv_accuracy == max(result.cv_by_C.values()) > 0.9
    held_out = (result.logits(x[1200:]).argmax(1) == y[1200:]).mean()
    assert held_out > 0.9
    layer = result.linear()
    with torch.no_grad():
        torch_logits = layer(torch.from_numpy(x[1200:])).numpy()
    np.testing.assert_allclose(torch_logits, result.logits(x[1200:]), rtol=1e-4, atol=1e-3)


def test_probe_handles_two_classes_and_classes_missing_from_training() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 1, (30, 4)), rng.normal(2, 1, (30, 4))]).astype(np.float32)
    y = np.array([0] * 30 + [2] * 30)  # class 1 has no training images
    result = fit_probe(x, y, num_classes=3)
    predicted = result.logits(x).argmax(1)
    assert (predicted == y).mean() > 0.95 and 1 not in predicted
    assert result.weight.shape == (3, 4)
