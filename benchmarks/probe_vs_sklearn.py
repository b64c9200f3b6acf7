"""Linear probe: finetune's fit_probe against scikit-learn's LogisticRegressionCV used plainly.

All fit the same problem: multinomial L2 logistic regression (L-BFGS, tol 1e-3, at most 300
iterations) on standardised features, C chosen from the same grid by the same stratified,
shuffled 3-fold cross-validation accuracy, then refitted on all training images. fit_probe
(which replaced a hand-written CV loop after this benchmark showed LogisticRegressionCV as
accurate and as fast) runs LogisticRegressionCV's folds side by side in threads on
single-threaded BLAS and refits itself (ties go to the C nearest 1). The plain uses: folds one
after another on single-threaded BLAS (``sklearn-1t``), or in joblib's worker processes
(``n_jobs=-1``, ``sklearn-jobs``). With default BLAS threads and no jobs, on a machine whose
cores are busy, LogisticRegressionCV was far slower (17-43x on lite0 features in one run), and
is left out to keep the run short.

    python benchmarks/probe_vs_sklearn.py [--quick]

Data (real images): scikit-learn's 8x8 digits, raw pixels and tf_efficientnet_lite0 features at
64 px; the shipped Fashion-MNIST sample (sample_data/fashion, 40 train images per class) and,
when Debian's ``dataset-fashion-mnist`` is installed, the 500-per-class ``fashion-large`` of
benchdata.py, with lite0 features at every probe point stage-probe tries (``--quick``: the head
only). Accuracy on each dataset's held-out test split; times are each fit's wall time.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from benchdata import FASHION, digits, fashion  # benchmarks/benchdata.py
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from finetune.data.features import HEAD, extract_features, probe_points
from finetune.data.scan import Sample, scan_folder
from finetune.data.transforms import Preprocessing
from finetune.model.backbone import create_backbone
from finetune.strategies.logistic import C_GRID, fit_probe

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "fashion"
DATA = Path(__file__).parent / "data"

# (name, features, labels, test features, test labels)
Problem = tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def sklearn_probe(
    x: np.ndarray, y: np.ndarray, n_jobs: int | None, threads: int | None = None
) -> tuple[Callable, float]:
    """LogisticRegressionCV set up as fit_probe is: its predict function and CV accuracy."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    folds = max(2, min(3, int(np.unique(y, return_counts=True)[1].min())))
    clf = LogisticRegressionCV(
        Cs=list(C_GRID),
        l1_ratios=(0.0,),
        cv=StratifiedKFold(folds, shuffle=True, random_state=0),
        scoring="accuracy",
        tol=1e-3,
        max_iter=300,
        random_state=0,
        n_jobs=n_jobs,
        use_legacy_attributes=False,
    )
    with warnings.catch_warnings(), threadpool_limits(threads, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(((x - mean) / std).astype(np.float64), y)
    cv = float(clf.scores_.mean(0).max())  # (folds, l1_ratios, Cs) -> best mean over folds
    return lambda t: clf.predict(((t - mean) / std).astype(np.float64)), cv


def finetune_probe(x: np.ndarray, y: np.ndarray) -> tuple[Callable, float]:
    result = fit_probe(x, y, int(y.max()) + 1)
    return lambda t: result.logits(t).argmax(1), result.cv_accuracy


def lite0_problems(name: str, root: Path, quick: bool) -> list[Problem]:
    """Features of ``root``'s train and test images at lite0's probe points (64 px)."""
    backbone = create_backbone("tf_efficientnet_lite0")
    pre = Preprocessing.from_model(backbone, 64)
    points = [HEAD] if quick else probe_points(backbone)
    split = scan_folder(root)
    test = [
        Sample(path, label)
        for label, name in enumerate(split.classes)
        for path in sorted((root / "test" / name).glob("*.png"))
    ]
    common = {"device": torch.device("cpu"), "progress": False}
    train_f, _ = extract_features(backbone, split.train, pre, points, **common)
    test_f, _ = extract_features(backbone, test, pre, points, **common)
    return [
        (f"{name} {p}", train_f[p], train_f["label"], test_f[p], test_f["label"]) for p in points
    ]


def problems(quick: bool) -> list[Problem]:
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    cut = int(0.6 * len(order))  # benchdata's digits split: 60% train, the last 20% test
    rows = [
        ("digits pixels", data.data[order[:cut]], data.target[order[:cut]],
         data.data[order[int(0.8 * len(order)):]], data.target[order[int(0.8 * len(order)):]]),
    ]  # fmt: skip
    rows += lite0_problems("digits", digits(DATA / "digits"), quick)
    rows += lite0_problems("fashion", SAMPLE, quick)
    if not quick and (FASHION / "train-images-idx3-ubyte.gz").is_file():
        rows += lite0_problems("fashion-large", fashion(DATA / "fashion-large", 500, 100), quick)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="head features only")
    args = parser.parse_args()
    methods = {
        "finetune": finetune_probe,
        "sklearn-1t": lambda x, y: sklearn_probe(x, y, n_jobs=None, threads=1),
        "sklearn-jobs": lambda x, y: sklearn_probe(x, y, n_jobs=-1),
    }
    print(f"C grid {C_GRID}, 3 folds; {os.cpu_count()} CPUs; time s, CV acc, test acc")
    header = f"{'problem':<22}{'n x dim':>11}"
    for name in methods:
        header += f" | {name:>12} {'cv':>5} {'test':>5}"
    print(header + " | time / finetune's: sklearn-1t, sklearn-jobs")
    totals = dict.fromkeys(methods, 0.0)
    wins = {name: [] for name in methods}  # test accuracy minus finetune's
    rows = problems(args.quick)
    warm = np.random.default_rng(0).normal(size=(60, 4))
    sklearn_probe(warm, np.arange(60) % 3, n_jobs=-1)  # joblib's workers start before timing
    for label, x, y, tx, ty in rows:
        line = f"{label:<22}{f'{len(y)}x{x.shape[1]}':>11}"
        seconds = {}
        accuracy = {}
        for name, method in methods.items():
            start = time.perf_counter()
            predict, cv = method(x, y)
            seconds[name] = time.perf_counter() - start
            accuracy[name] = float((predict(tx) == ty).mean())
            totals[name] += seconds[name]
            wins[name].append(accuracy[name] - accuracy["finetune"])
            line += f" | {seconds[name]:>12.2f} {cv:>5.3f} {accuracy[name]:>5.3f}"
        ratios = [seconds[n] / seconds["finetune"] for n in ("sklearn-1t", "sklearn-jobs")]
        print(line + f" | {ratios[0]:.2f}x, {ratios[1]:.2f}x", flush=True)
    print(
        "total time: "
        + ", ".join(f"{n} {t:.1f} s ({t / totals['finetune']:.2f}x)" for n, t in totals.items())
    )
    for name in ("sklearn-1t", "sklearn-jobs"):
        diffs = np.array(wins[name])
        print(
            f"{name}: test accuracy minus finetune's: mean {diffs.mean():+.4f}, "
            f"min {diffs.min():+.4f}, max {diffs.max():+.4f}"
        )


if __name__ == "__main__":
    main()
