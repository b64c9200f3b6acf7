"""Every strategy, fixed and ``auto``, on real datasets of different character: test accuracy
and wall time in one table.

    apt-get install dataset-fashion-mnist   # for the two Fashion-MNIST sets
    python benchmarks/strategy_matrix.py [--datasets fashion-small digits ...] [--epochs N]

Datasets (benchmarks/benchdata.py) are written once under benchmarks/data/. Each strategy trains
on train/ (validating on val/) with its defaults on this machine, then the best checkpoint
classifies test/, which no run ever sees. Feature caches are disabled so every probe pays for
its own feature extraction.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from benchdata import build  # benchmarks/benchdata.py

import finetune
from finetune.inference.predict import expand_inputs

STRATEGIES = ("linear", "stage-probe", "finetune-top", "finetune-all", "auto")


def test_accuracy(run_dir: Path, test_dir: Path) -> float:
    predictor = finetune.load(run_dir, device="cpu")
    predictions = predictor.predict(expand_inputs([test_dir]), batch_size=128)
    return float(np.mean([Path(p.path).parent.name == p.label for p in predictions]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=None)
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    parser.add_argument("--epochs", type=int, default=None, help="fixed strategies' epochs")
    args = parser.parse_args()
    data = build(Path(__file__).parent / "data")
    names = args.datasets or list(data)
    warnings.simplefilter("ignore")
    rows = []
    header = ("dataset", "strategy", "ran", "px", "ep", "test acc", "time s")
    print("{:<15}{:<14}{:<14}{:>4}{:>4}{:>10}{:>9}".format(*header))
    for name in names:
        for strategy in args.strategies:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                options = {"epochs": args.epochs} if args.epochs and strategy != "auto" else {}
                run = finetune.fit(
                    data[name] / "",
                    strategy=strategy,
                    out=str(Path(tmp) / "run"),
                    verbose=False,
                    feature_cache=False,
                    **options,
                )
                seconds = time.perf_counter() - start
                acc = test_accuracy(run.dir, data[name] / "test")
            ran = run.strategy if strategy == "auto" else ""
            rows.append((name, strategy, ran, acc, seconds))
            print(
                f"{name:<15}{strategy:<14}{ran:<14}{run.config.image_size:>4}"
                f"{run.config.epochs:>4}{acc:>10.3f}{seconds:>9.1f}",
                flush=True,
            )
    print()
    for name in names:
        fixed = [(acc, s) for n, s, _, acc, _ in rows if n == name and s != "auto"]
        auto = [acc for n, s, _, acc, _ in rows if n == name and s == "auto"]
        if fixed and auto:
            best_acc, best = max(fixed)
            print(
                f"{name}: best fixed {best} {best_acc:.3f}, auto {auto[0]:.3f} "
                f"({(auto[0] - best_acc) * 100:+.1f} points)"
            )


if __name__ == "__main__":
    main()
