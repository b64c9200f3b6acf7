"""Linear-probe fitting time: finetune's fit_probe (a warm-started regularisation path per fold,
folds side by side on single-threaded BLAS) against independent scikit-learn fits per C with
default threading (the baseline), on the same real features, side by side.

    python benchmarks/probe_speed.py [--dataset fashion-large]

Features are those stage-probe uses (every stage of tf_efficientnet_lite0, 64 px), from the
feature cache after the first run.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from benchdata import build  # benchmarks/benchdata.py
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score

from finetune.data.features import extract_features, probe_points
from finetune.data.scan import scan_folder
from finetune.data.transforms import Preprocessing
from finetune.model.backbone import create_backbone
from finetune.strategies.logistic import C_GRID, fit_probe


def independent_fits(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Baseline: a fresh L-BFGS fit for every C and fold (cross_val_score), then the final fit."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for C in C_GRID:
            model = LogisticRegression(C=C, max_iter=300, tol=1e-3, random_state=0)
            folds = StratifiedKFold(3, shuffle=True, random_state=0)
            scores[C] = float(np.mean(cross_val_score(model, x, y, cv=folds)))
        best = max(scores, key=scores.get)
        LogisticRegression(C=best, max_iter=300, tol=1e-3, random_state=0).fit(x, y)
    return best, scores[best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-large")
    args = parser.parse_args()
    root = build(Path(__file__).parent / "data")[args.dataset]
    backbone = create_backbone("tf_efficientnet_lite0")
    split = scan_folder(root)
    pre = Preprocessing.from_model(backbone, 64)
    points = probe_points(backbone)
    feats, _ = extract_features(
        backbone, split.train, pre, points, device=torch.device("cpu"), progress=False
    )
    print(f"{args.dataset}: {len(feats['label'])} training images, C grid {C_GRID}, 3 folds")
    print(f"{'point':<8}{'dim':>6}{'baseline s':>12}{'cv acc':>8}{'finetune s':>12}{'cv acc':>8}")
    totals = [0.0, 0.0]
    for point in points:
        x, y = feats[point], feats["label"]
        start = time.perf_counter()
        _, base_acc = independent_fits(x, y)
        base_s = time.perf_counter() - start
        start = time.perf_counter()
        result = fit_probe(x, y, len(split.classes))
        ours_s = time.perf_counter() - start
        totals[0] += base_s
        totals[1] += ours_s
        print(
            f"{point:<8}{x.shape[1]:>6}{base_s:>12.1f}{base_acc:>8.3f}{ours_s:>12.1f}"
            f"{result.cv_accuracy:>8.3f}",
            flush=True,
        )
    ratio = totals[0] / totals[1]
    print(f"{'all':<14}{totals[0]:>12.1f}{'':>8}{totals[1]:>12.1f}   ({ratio:.1f}x)")


if __name__ == "__main__":
    main()
