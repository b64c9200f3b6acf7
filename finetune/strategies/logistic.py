"""Linear probes: multinomial logistic regression on frozen features, regularisation by CV.

scikit-learn's L-BFGS logistic regression is fitted on standardised features for each inverse
regularisation strength C of a log grid; stratified k-fold cross-validation on the training set
picks C. The standardisation is then folded into the weights, so the result is one plain
``nn.Linear`` on the raw features.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits
from torch import nn

__all__ = ["C_GRID", "ProbeResult", "fit_probe"]

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # inverse L2 strength on standardised features


@dataclass(frozen=True)
class ProbeResult:
    """A fitted probe: weights on raw features and how well it cross-validated."""

    weight: np.ndarray  # (num_classes, num_features)
    bias: np.ndarray  # (num_classes,)
    C: float  # chosen inverse regularisation strength
    cv_accuracy: float  # mean cross-validated accuracy at that C
    cv_by_C: dict[float, float]

    def linear(self) -> nn.Linear:
        """The probe as an ``nn.Linear`` (float32)."""
        layer = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        # no_grad, not inference_mode: no inference here, but a write into parameters, done
        # the way torch.nn.init does it.
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(self.weight))
            layer.bias.copy_(torch.from_numpy(self.bias))
        return layer

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight.T + self.bias


def _model(C: float, seed: int, balanced: bool = False) -> LogisticRegression:
    return LogisticRegression(
        C=C,
        max_iter=300,
        tol=1e-3,
        random_state=seed,
        warm_start=True,
        class_weight="balanced" if balanced else None,
    )


def fit_probe(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    seed: int = 0,
    grid: tuple[float, ...] = C_GRID,
    folds: int = 3,
    balanced: bool = False,
) -> ProbeResult:
    """Fit a logistic-regression probe, choosing C by stratified k-fold CV accuracy.

    Args:
        features: (N, D) training features.
        labels: (N,) class indices in ``range(num_classes)``.
        num_classes: Number of classes of the model (labels may not cover all of them).
        folds: CV folds (fewer when the smallest class has fewer images).
        balanced: Weight each class's loss by the inverse of its frequency (imbalanced data).
    """
    mean = features.mean(0)
    std = features.std(0) + 1e-6
    x = ((features - mean) / std).astype(np.float64)
    smallest = int(np.unique(labels, return_counts=True)[1].min()) if len(labels) else 0
    k = max(2, min(folds, smallest))
    grid = tuple(sorted(grid))
    cv_by_C: dict[float, list[float]] = {C: [] for C in grid}

    def path(train: np.ndarray, test: np.ndarray) -> list[float]:
        # One regularisation path per fold, weakest C first, each fit warm-started from the
        # last: a fraction of the iterations of independent fits.
        clf = _model(grid[0], seed, balanced)
        scores = []
        for C in grid:
            clf.set_params(C=C).fit(x[train], labels[train])
            scores.append(float(clf.score(x[test], labels[test])))
        return scores

    # Single-threaded BLAS is several times faster on these small, thin matrices than BLAS
    # spreading each product over the cores; the folds run side by side on the cores instead.
    with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a capped iteration count is fine
        if smallest >= 2:
            splits = StratifiedKFold(k, shuffle=True, random_state=seed).split(x, labels)
            with ThreadPoolExecutor(min(k, os.cpu_count() or 1)) as pool:
                for fold in pool.map(lambda s: path(*s), splits):
                    for C, score in zip(grid, fold, strict=True):
                        cv_by_C[C].append(score)
        scores = {C: float(np.mean(v)) if v else float("nan") for C, v in cv_by_C.items()}
        best_C = max(grid, key=lambda c: (np.nan_to_num(scores[c], nan=-1.0), -abs(np.log10(c))))
        clf = _model(best_C, seed, balanced).fit(x, labels)
    coef = np.zeros((num_classes, x.shape[1]))
    intercept = np.zeros(num_classes)
    if len(clf.classes_) == 2:  # sklearn's binary form: one logit for classes_[1]
        coef[clf.classes_[1]], intercept[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
    else:
        coef[clf.classes_], intercept[clf.classes_] = clf.coef_, clf.intercept_
    missing = np.setdiff1d(np.arange(num_classes), clf.classes_)
    intercept[missing] = -1e4  # classes absent from training are never predicted
    weight = coef / std
    bias = intercept - coef @ (mean / std)
    return ProbeResult(
        weight.astype(np.float32), bias.astype(np.float32), best_C, scores[best_C], scores
    )
