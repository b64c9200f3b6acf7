"""What training augmentation and test-time augmentation do to accuracy, on real datasets.

Every row is the same fine-tune (``finetune-all``, same seed, same epochs, same image size) with
one augmentation preset (``none``, ``light``, ``default``, ``strong``); every trained model is then
scored on the held-out test/ folder with no TTA, ``flip`` and ``10crop``. Side by side, one run.

    apt-get install dataset-fashion-mnist   # for Fashion-MNIST
    python benchmarks/augmentation_accuracy.py [--epochs 8] [--seeds 0 1] [--datasets ...]

Datasets (benchmarks/benchdata.py): ``fashion-medium`` (Fashion-MNIST, 100 train / 50 val per
class, 100 test per class; 28 px greyscale, trained at 64 px) and ``photos`` (crops of seven real
colour photos, 30 / 15 / 30 per class, trained at 96 px). With this little data the preset
``auto`` picks is ``strong``.

Accuracy differences of a point or two on 700-1,000 test images are within seed noise: run more
``--seeds`` before believing a small gap.
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

from benchdata import fashion, photos  # benchmarks/benchdata.py

import finetune
from finetune.inference.evaluate import evaluate

PRESETS = ("none", "light", "default", "strong")
TTA = ("none", "flip", "10crop")
DATASETS = {
    "fashion-medium": (lambda base: fashion(base / "fashion-medium", 100, 50), 64),
    "photos": (lambda base: photos(base / "photos"), 96),
}


def run_one(root: Path, tmp: str, preset: str, seed: int, epochs: int, size: int) -> dict:
    start = time.perf_counter()
    run = finetune.fit(
        root,
        strategy="finetune-all",
        augment=preset,
        epochs=epochs,
        image_size=size,
        seed=seed,
        device="cpu",
        out=f"{tmp}/{root.name}-{preset}-{seed}",
        verbose=False,
    )
    seconds = time.perf_counter() - start
    predictor = finetune.load(run.dir, device="cpu")
    test = {t: evaluate(predictor, root / "test", batch_size=64, tta=t).accuracy for t in TTA}
    return {"val": run.best_metric, "seconds": seconds, **{f"test {t}": a for t, a in test.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            build, size = DATASETS[name]
            root = build(args.data)
            print(f"\n{name}: {root}, finetune-all, {args.epochs} epochs, {size} px, "
                  f"seeds {args.seeds} (mean over seeds)")  # fmt: skip
            columns = ["val", *(f"test {t}" for t in TTA), "seconds"]
            print(f"{'augment':<9}" + "".join(f"{c:>13}" for c in columns))
            for preset in args.presets:
                rows = [run_one(root, tmp, preset, s, args.epochs, size) for s in args.seeds]
                means = {c: statistics.fmean(r[c] for r in rows) for c in columns}
                cells = [f"{means[c]:>13.3f}" for c in columns[:-1]]
                spread = ""
                if len(rows) > 1:
                    spread = (
                        "  (test per seed: "
                        + ", ".join(f"{r['test none']:.3f}" for r in rows)
                        + ")"
                    )
                print(f"{preset:<9}" + "".join(cells) + f"{means['seconds']:>12.0f}s" + spread)
            print(f"  test images: {len(list((root / 'test').rglob('*.png')))}")


if __name__ == "__main__":
    main()
