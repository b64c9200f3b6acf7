"""finetune-top with its frozen layers run once (``--cache-frozen``) against every step, side by
side in one run, on the same data, options and seed.

For each case, ``finetune fit --strategy finetune-top --augment none`` (with ``--hflip`` in the
``+flip`` rows) runs twice: with the frozen layers' outputs computed once before epoch 1
(finetune/model/frozen.py) and with ``--no-cache-frozen``. Printed per row: the median epoch time of
epochs 2..N (from metrics.csv: training and validation), the whole run's wall time (start-up,
the cache's pass, the report left out), the best val accuracy and the accuracy of best.pt on the
held-out test folder. Without flips the two runs must agree to the last digit (the same batches,
the same arithmetic); with flips they draw their mirror images from different random streams.

Cases (``--cases``):

- ``fashion@64``: Fashion-MNIST, 100 train / 20 val / 100 test per class (28 px PNGs), 64 px;
- ``photos@224``: 1600x1200 JPEG photos (``benchdata.photo_files``, 40 train / 10 val per
  class; tested on the val folder), 224 px, decoded-image cache on;
- ``...:u0``: ``--unfreeze 0``, only the head trains (the frozen part is the whole backbone).

    apt-get install dataset-fashion-mnist     # for the fashion cases
    python benchmarks/frozen_speed.py [--cases fashion@64 fashion@64:u0 photos@224] [--epochs 4]
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

import torch
from benchdata import fashion, photo_files  # benchmarks/benchdata.py

import finetune
from finetune.training.loop import read_metrics

CASES = ("fashion@64", "fashion@64:u0", "photos@224")


def dataset(name: str, base: Path) -> tuple[Path, Path]:
    """(the training folder with train/ and val/, the folder to test on)."""
    if name == "fashion":
        root = fashion(base / "fashion-100-20", 100, 20)
        return root, root / "test"
    root = photo_files(base / "photos-1600x1200-40-10", (40, 10), 1600, 1200)
    return root, root / "val"


def one(root: Path, test: Path, size: int, unfreeze: int | None, flip: bool, cached: bool,
        epochs: int, out: Path) -> dict[str, float]:  # fmt: skip
    start = time.perf_counter()
    run = finetune.fit(
        root, strategy="finetune-top", epochs=epochs, image_size=size, augment="none",
        hflip=flip or None, unfreeze=unfreeze, cache_frozen=cached, device="cpu",
        out=str(out), verbose=False, report=False,
    )  # fmt: skip
    wall = time.perf_counter() - start
    rows = read_metrics(run.dir / "metrics.csv")
    evaluation = finetune.load(run.dir, device="cpu").evaluate(test)
    return {
        "epoch": statistics.median(r.seconds for r in rows[1:]),
        "wall": wall,
        "val": run.best_metric,
        "test": evaluation.accuracy,
        "loss": rows[-1].train_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), help=", ".join(CASES))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"tf_efficientnet_lite0, finetune-top, batch 32, {args.epochs} epochs, cpu "
          f"({torch.get_num_threads()} threads, {os.cpu_count()} cores)")  # fmt: skip
    print(f"{'case':<15} {'augment':<10} {'frozen layers':<14} {'epoch s':>8} {'wall s':>7} "
          f"{'val acc':>8} {'test acc':>9} {'last loss':>10} {'epoch x':>8}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FINETUNE_CACHE_DIR"] = str(Path(tmp) / "cache")
        for case in args.cases:
            name, rest = case.split("@")
            size, _, tag = rest.partition(":")
            unfreeze = int(tag.removeprefix("u")) if tag else None
            root, test = dataset(name, args.data)
            for flip in (False, True):
                results = {}
                for cached in (True, False):
                    out = Path(tmp) / f"{case}-{flip}-{cached}".replace(":", "-")
                    results[cached] = one(root, test, int(size), unfreeze, flip, cached,
                                          args.epochs, out)  # fmt: skip
                for cached, r in results.items():
                    ratio = results[False]["epoch"] / r["epoch"]
                    print(f"{case:<15} {'none+flip' if flip else 'none':<10} "
                          f"{'once' if cached else 'every step':<14} {r['epoch']:8.2f} "
                          f"{r['wall']:7.1f} {r['val']:8.3f} {r['test']:9.3f} "
                          f"{r['loss']:10.6f} {ratio:7.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
