"""Linear probes: multinomial logistic regression on frozen features, regularisation by CV.

scikit-learn's L-BFGS logistic regression is fitted on standardised features for each inverse
regularisation strength C of a log grid; stratified k-fold cross-validation on the training set
(scikit-learn's ``LogisticRegressionCV``) picks C. The standardisation is then folded into the
weights, so the result is one plain ``nn.Linear`` on the raw features.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from joblib import parallel_config
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
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
    scores = dict.fromkeys(grid, float("nan"))
    # Spreading each product of these small, thin matrices over the cores costs more than it
    # saves, so BLAS runs single-threaded and the folds run side by side in threads instead
    # (benchmarks/probe_speed.py measures it; docs/speed.md).
    # LogisticRegressionCV runs one warm-started regularisation path per fold (weakest C first);
    # the final fit is made here, so that ties between Cs go to the C nearest 1.
    with (
        warnings.catch_warnings(),
        threadpool_limits(1, user_api="blas"),
        parallel_config(backend="threading", n_jobs=min(k, os.cpu_count() or 1)),
    ):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a capped iteration count is fine
        if smallest >= 2:
            cv = LogisticRegressionCV(
                Cs=list(grid),
                l1_ratios=(0.0,),
                cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                scoring="accuracy",
                refit=False,
                max_iter=300,
                tol=1e-3,
                random_state=seed,
                class_weight="balanced" if balanced else None,
                use_legacy_attributes=False,
            ).fit(x, labels)
            scores = dict(zip(grid, cv.scores_.mean(axis=0)[0].tolist(), strict=True))
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
