"""Weight averaging and ensembles against the plain final model, on a real dataset.

Side by side, same data, seed, epochs and image size (``finetune-all``), scored on the held-out
test/ folder (never seen in training or model selection):

- ``final``: the raw weights after the last epoch (cosine schedule) — the baseline;
- ``best``: the raw weights of the epoch with the best val accuracy (``best.pt``);
- ``ema``: the exponential moving average of the same run's weights (``--ema``, ``ema.pt``);
- ``restarts final``: the last cycle's weights of a run with ``--schedule restarts`` (same
  epochs, K cosine cycles);
- ``snapshots``: the snapshot ensemble of that run: the softmax averaged over the K snapshots
  taken at the end of each cycle (``--checkpoint snapshots``);
- ``models``: a model ensemble of the two runs' final weights (``--ensemble``).

    apt-get install dataset-fashion-mnist
    python benchmarks/averaging.py [--epochs 10] [--cycles 3] [--seeds 0 1]

Differences of a point on 1,000 test images are within seed noise: run more ``--seeds``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchdata import fashion  # benchmarks/benchdata.py

import finetune
from finetune.inference.evaluate import evaluate

ROWS = ("final", "best", "ema", "restarts final", "snapshots", "models")


def run_seed(root: Path, tmp: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    common = {
        "strategy": "finetune-all",
        "epochs": args.epochs,
        "image_size": args.image_size,
        "seed": seed,
        "device": "cpu",
        "verbose": False,
    }
    start = time.perf_counter()
    cosine = finetune.fit(root, ema=True, out=f"{tmp}/cosine-{seed}", **common)
    restarts = finetune.fit(
        root, schedule="restarts", cycles=args.cycles, out=f"{tmp}/restarts-{seed}", **common
    )
    print(f"  seed {seed}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    predictors = {
        "final": finetune.load(cosine.dir, checkpoint="last", device="cpu"),
        "best": finetune.load(cosine.dir, checkpoint="best", device="cpu"),
        "ema": finetune.load(cosine.dir, checkpoint="ema", device="cpu"),
        "restarts final": finetune.load(restarts.dir, checkpoint="last", device="cpu"),
        "snapshots": finetune.load(restarts.dir, checkpoint="snapshots", device="cpu"),
        "models": finetune.load_ensemble(
            [cosine.dir, restarts.dir], checkpoint="last", device="cpu"
        ),
    }
    return {
        name: evaluate(predictor, root / "test", batch_size=64).accuracy
        for name, predictor in predictors.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train", type=int, default=100, help="training images per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    root = fashion(args.data / f"fashion-{args.train}", args.train, 50)
    print(
        f"Fashion-MNIST, {args.train} train / 50 val / 100 test per class, finetune-all, "
        f"{args.epochs} epochs, {args.image_size} px, restarts: {args.cycles} cycles, "
        f"seeds {args.seeds}"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            results.append(run_seed(root, tmp, seed, args))
    print(f"\n{'model':<16}{'test acc (mean)':>16}{'vs final':>10}   per seed")
    base = statistics.mean(r["final"] for r in results)
    for name in ROWS:
        values = [r[name] for r in results]
        mean = statistics.mean(values)
        per_seed = ", ".join(f"{v:.3f}" for v in values)
        print(f"{name:<16}{mean:>16.3f}{(mean - base) * 100:>+9.1f}p   {per_seed}")


if __name__ == "__main__":
    main()
