"""What ``finetune tune`` buys over the default learning rate and weight decay, on real data.

One fine-tune with the default config (``--strategy`` finetune-top unless told otherwise: tune
needs a strategy with a learning rate, and auto picks a probe for this little data), then
``finetune.tune`` with ``--trials`` trials of at most the same epochs each (the coarse stage a
third of them, the fine stage all). Both best checkpoints (the default run's, the best trial's)
classify the same held-out test/ folder, which neither ever saw; one table, side by side.

    apt-get install dataset-fashion-mnist   # Debian's package, MIT licence
    python benchmarks/tune.py [--trials 8] [--epochs 6] [--train 100] [--val 50]

Dataset (benchmarks/benchdata.py): Fashion-MNIST, ``--train`` / ``--val`` images per class from
its training file and 100 per class from its test file, written once under benchmarks/data/.
Selection by val accuracy over many trials flatters val: the test column is the honest one, and
a gap of a point or two on 1,000 test images is within seed noise.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchdata import fashion  # benchmarks/benchdata.py
from predict import cpu_seconds, others_share  # benchmarks/predict.py

import finetune
from finetune.config import DEFAULT_LR, FitConfig
from finetune.inference.evaluate import evaluate


def test_accuracy(run_dir: Path, test_dir: Path, device: str | None) -> float:
    predictor = finetune.load(run_dir, device=device)
    return evaluate(predictor, test_dir, batch_size=64).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6, help="per run, and per tune trial")
    parser.add_argument("--strategy", default="finetune-top",
                        choices=["finetune-top", "finetune-all"])  # fmt: skip
    parser.add_argument("--image-size", type=int, default=None, help="[default: fit's choice]")
    parser.add_argument("--train", type=int, default=100, help="training images per class")
    parser.add_argument("--val", type=int, default=50, help="validation images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="[default: cuda when available]")
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    root = fashion(args.data / f"fashion-{args.train}-{args.val}", args.train, args.val)
    config = FitConfig(
        strategy=args.strategy,
        epochs=args.epochs,
        image_size=args.image_size,
        seed=args.seed,
        device=args.device,
    )
    usage, started = cpu_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        begun = time.perf_counter()
        default = finetune.fit(root, config, out=f"{tmp}/default", verbose=False)
        default_minutes = (time.perf_counter() - begun) / 60
        print(f"default   val acc {default.best_metric:.3f} in {default_minutes:.1f} min",
              flush=True)  # fmt: skip
        tuned = finetune.tune(root, config, trials=args.trials, out=f"{tmp}/tune", seed=args.seed)
        best = tuned.best
        rows = [
            ("default", config.lr or DEFAULT_LR[config.optimizer], config.weight_decay,
             args.epochs, default.best_metric, test_accuracy(default.dir, root / "test",
             args.device), default_minutes),
            (f"tune ({len(tuned.trials)} trials, best {best.trial})", best.lr, best.weight_decay,
             best.epochs, best.val_acc, test_accuracy(best.run_dir, root / "test", args.device),
             tuned.seconds / 60),
        ]  # fmt: skip
        print()
        print(tuned.table())
    wall = time.perf_counter() - started
    size = default.config.image_size
    print(
        f"\n{root}: Fashion-MNIST, {args.train} train / {args.val} val / 100 test images per "
        f"class; {args.strategy}, {args.epochs} epoch(s) per run, {size} px, "
        f"{default.config.device}"
    )
    header = ("config", "lr", "wd", "epochs", "val acc", "test acc", "min")
    print("{:<26}{:>10}{:>10}{:>7}{:>9}{:>10}{:>7}".format(*header))
    for name, lr, wd, epochs, val, test, minutes in rows:
        print(f"{name:<26}{lr:>10.2e}{wd:>10.2e}{epochs:>7}{val:>9.3f}{test:>10.3f}{minutes:>7.1f}")
    print(f"({others_share(usage, wall)})")


if __name__ == "__main__":
    main()
