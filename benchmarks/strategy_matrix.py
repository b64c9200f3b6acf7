"""Every strategy, fixed and ``auto``, on real datasets of different character: test accuracy
and wall time in one table.

    apt-get install dataset-fashion-mnist   # for the two Fashion-MNIST sets
    python benchmarks/strategy_matrix.py [--datasets fashion-small digits ...] [--epochs N]
        [--busy N]

Datasets (benchmarks/benchdata.py) are written once under benchmarks/data/. Each strategy trains
on train/ (validating on val/) with its defaults on this machine, then the best checkpoint
classifies test/, which no run ever sees. Feature caches are disabled so every probe pays for
its own feature extraction. For auto, ``/budget`` is its wall time over the CPU budget it sized
a fine-tune to, and ``kept`` which of its probe baseline and its fine-tune went to best.pt, with
the probe's own test accuracy. ``--busy N`` keeps N processes spinning on the CPU throughout (a
shared machine).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
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
    parser.add_argument(
        "--busy", type=int, default=0, help="processes spinning on the CPU the whole time"
    )
    args = parser.parse_args()
    data = build(Path(__file__).parent / "data")
    names = args.datasets or list(data)
    warnings.simplefilter("ignore")
    spin = "while True:\n    pass\n"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(args.busy)]
    try:
        _matrix(args, data, names)
    finally:
        for spinner in spinners:
            spinner.kill()


def _matrix(args: argparse.Namespace, data: dict[str, Path], names: list[str]) -> None:
    if args.busy:
        print(f"({args.busy} busy process(es) spinning on the CPU throughout)")
    rows = []
    header = ("dataset", "strategy", "ran", "px", "ep", "test acc", "time s", "/budget", "kept")
    print("{:<15}{:<14}{:<14}{:>4}{:>4}{:>10}{:>9}{:>9}  {}".format(*header))
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
                kept = ""
                comparison = run.comparison
                if comparison is not None:  # auto's own probe, on the same test images
                    probe_acc = test_accuracy(run.dir / "baseline", data[name] / "test")
                    kept = (
                        f"{comparison.kept} (val: probe {comparison.probe_val_acc:.3f}, "
                        f"fine-tune {comparison.finetune_val_acc:.3f}; test: its probe "
                        f"{probe_acc:.3f})"
                    )
            ran = run.strategy if strategy == "auto" else ""
            budget = run.decision.budget_seconds if run.decision is not None else None
            ratio = f"{seconds / budget:.2f}" if budget else "-"
            rows.append((name, strategy, ran, acc, seconds))
            print(
                f"{name:<15}{strategy:<14}{ran:<14}{run.config.image_size:>4}"
                f"{run.config.epochs:>4}{acc:>10.3f}{seconds:>9.1f}{ratio:>9}  {kept}",
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
