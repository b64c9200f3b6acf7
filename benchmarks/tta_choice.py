"""TTA only where it helps: none, flip and 10crop scored on val by ``fit`` (and the mode it
chose) next to the same three on the test images, per strategy and dataset.

    apt-get install dataset-fashion-mnist   # for the Fashion-MNIST sets
    python benchmarks/tta_choice.py [--datasets digits fashion-edges ...] [--epochs 3]

Datasets come from benchmarks/benchdata.py (written once under benchmarks/data/). Each run fits
on train/ with val/ as its validation set (where the choice is made) and is then scored on
test/, which fit never reads: ``auto test`` is the test accuracy of the mode fit chose, ``regret``
how far it is below the best mode on test, and ``score s`` the seconds the scoring of the ten
views took at the end of the fit (measured again here, on val).
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
from finetune.config import TTA_MODES
from finetune.inference.predict import expand_inputs
from finetune.inference.tta import (
    CHANCE,
    choose,
    correct_by_mode,
    score_tta,
    sign_test,
    ten_views,
)

STRATEGIES = ("linear", "stage-probe", "finetune-top", "finetune-all")


def cautious(correct: dict[str, np.ndarray]) -> str:
    """The rule tried first and set aside: a mode with more views replaces the choice so far
    only when its wins over it pass a one-sided sign test at p <= CHANCE."""
    chosen = "none"
    for mode in TTA_MODES[1:]:
        wins = int(np.sum(correct[mode] & ~correct[chosen]))
        losses = int(np.sum(~correct[mode] & correct[chosen]))
        if sign_test(wins, losses) <= CHANCE:
            chosen = mode
    return chosen


RULES = {
    "auto (most accurate on val)": lambda correct: choose(correct)[0],
    "sign test first (p <= 0.1)": cautious,
    "always none": lambda correct: "none",
    "always 10crop": lambda correct: "10crop",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=None)
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    parser.add_argument("--epochs", type=int, default=3, help="the fine-tunes' epochs")
    args = parser.parse_args()
    data = build(Path(__file__).parent / "data")
    names = args.datasets or list(data)
    warnings.simplefilter("ignore")
    modes = " / ".join(TTA_MODES)
    print(f"{'dataset':<15}{'strategy':<14}{'val ' + modes:>26}{'chose':>8}"
          f"{'test ' + modes:>27}{'auto test':>11}{'regret':>8}{'score s':>9}")  # fmt: skip
    regrets: dict[str, list[float]] = {rule: [] for rule in RULES}
    for name in names:
        root = data[name]
        for strategy in args.strategies:
            epochs = {} if strategy in ("linear", "stage-probe") else {"epochs": args.epochs}
            with tempfile.TemporaryDirectory() as tmp:
                run = finetune.fit(
                    root, strategy=strategy, out=str(Path(tmp) / "run"), verbose=False,
                    report=False, feature_cache=False, **epochs,
                )  # fmt: skip
                record = run.tta
                predictor = finetune.load(run.dir, device="cpu")
                index = {c: i for i, c in enumerate(predictor.classes)}
                test = [(p, index[p.parent.name]) for p in expand_inputs([root / "test"])]
                on_test = score_tta(predictor, test, limit=len(test))
                val = [(s, index[s.parent.name]) for s in expand_inputs([root / "val"])]
                start = time.perf_counter()
                probs, truth = ten_views(predictor, val)
                seconds = time.perf_counter() - start
            val_correct = correct_by_mode(probs, truth)
            best = max(on_test.accuracy.values())
            for rule, pick in RULES.items():
                regrets[rule].append(best - on_test.accuracy[pick(val_correct)])
            chosen = record.chosen
            v = " / ".join(f"{record.accuracy[m]:.3f}" for m in TTA_MODES)
            t = " / ".join(f"{on_test.accuracy[m]:.3f}" for m in TTA_MODES)
            print(f"{name:<15}{strategy:<14}{v:>26}{chosen:>8}{t:>27}"
                  f"{on_test.accuracy[chosen]:>11.3f}{best - on_test.accuracy[chosen]:>8.3f}"
                  f"{seconds:>9.1f}", flush=True)  # fmt: skip
    print("\nmean test accuracy below the best mode, over the runs above, per rule:")
    for rule, values in regrets.items():
        print(f"  {rule:<30}{np.mean(values) * 100:>6.2f} points (worst {max(values) * 100:.1f})")


if __name__ == "__main__":
    main()
