"""`linear` (features computed once, logistic regression on the cache) against the baseline it
replaces: the same frozen backbone and linear head trained for E epochs with a backbone forward
pass over the (augmented) images every epoch. Side by side, same data, one run.

    apt-get install dataset-fashion-mnist   # for Fashion-MNIST
    python benchmarks/linear_speed.py [--epochs 10] [--datasets fashion-small digits photos]

Rows per dataset:
- ``per-epoch forward``: finetune-top with --unfreeze 0 (backbone frozen, BatchNorm in eval
  mode, only the head trains), random head init, E epochs: the baseline.
- ``cached head, E ep``: the same head, optimiser, batch size and E epochs, trained on features
  computed once (the torch route the issue allows).
- ``linear``: the shipped strategy: features once, L-BFGS logistic regression, C by 3-fold CV.
- ``linear, warm cache``: the same again; features come from the disk cache.

``train s`` is the time of the training stage (feature pass included, model loading excluded);
``total s`` is the whole ``finetune.fit`` call. Test accuracy is on test/, never seen in training.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from benchdata import build  # benchmarks/benchdata.py

import finetune
from finetune.data.features import HEAD, extract_features
from finetune.data.scan import scan_folder
from finetune.data.transforms import Preprocessing, choose_image_size
from finetune.inference.predict import expand_inputs
from finetune.model.backbone import create_backbone


def test_accuracy(run_dir: Path, test_dir: Path) -> float:
    predictions = finetune.load(run_dir, device="cpu").predict(
        expand_inputs([test_dir]), batch_size=128
    )
    return float(np.mean([Path(p.path).parent.name == p.label for p in predictions]))


def fit(root: Path, tmp: str, name: str, **options) -> tuple[float, float, float]:
    start = time.perf_counter()
    run = finetune.fit(root, out=f"{tmp}/{name}", verbose=False, **options)
    total = time.perf_counter() - start
    train = sum(r.seconds for r in run.history)
    return train, total, test_accuracy(run.dir, root / "test")


def cached_head(root: Path, epochs: int, cache: str) -> tuple[float, float, float]:
    """A linear head trained for ``epochs`` on features computed once (AdamW 1e-3, batch 32)."""
    start = time.perf_counter()
    backbone = create_backbone("tf_efficientnet_lite0")
    split = scan_folder(root)
    side = choose_image_size(Preprocessing.from_model(backbone).input_size, split.median_side)
    pre = Preprocessing.from_model(backbone, side)
    test = scan_folder(root / "test", val_split=0.5)
    cpu = torch.device("cpu")
    loaded = time.perf_counter()
    os.environ["FINETUNE_CACHE_DIR"] = cache  # cold: its own empty cache
    train, _ = extract_features(backbone, split.train, pre, [HEAD], device=cpu, progress=False)
    x, y = torch.from_numpy(train[HEAD]), torch.from_numpy(train["label"]).long()
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], len(split.classes))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            loss = F.cross_entropy(head(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    train_s = time.perf_counter() - loaded
    total = time.perf_counter() - start
    feats = [
        extract_features(backbone, s, pre, [HEAD], device=cpu, cache=False, progress=False)[0]
        for s in (test.train, test.val)
    ]
    tx = torch.from_numpy(np.concatenate([f[HEAD] for f in feats]))
    names = [test.classes[i] for f in feats for i in f["label"]]
    with torch.no_grad():
        predicted = [split.classes[i] for i in head(tx).argmax(1)]
    acc = float(np.mean([a == b for a, b in zip(predicted, names, strict=True)]))
    return train_s, total, acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--datasets", nargs="*", default=["fashion-small", "digits", "photos"])
    args = parser.parse_args()
    data = build(Path(__file__).parent / "data")
    warnings.simplefilter("ignore")
    e = args.epochs
    print(
        f"{'dataset':<15}{'method':<24}{'train s':>9}{'total s':>9}{'test acc':>10}{'speed-up':>10}"
    )
    for name in args.datasets:
        root = data[name]
        with tempfile.TemporaryDirectory() as tmp:
            cache = f"{tmp}/cache"
            os.environ["FINETUNE_CACHE_DIR"] = cache
            rows = {
                "per-epoch forward": fit(
                    root,
                    tmp,
                    "base",
                    strategy="finetune-top",
                    unfreeze=0,
                    epochs=e,
                    feature_cache=False,
                ),
                f"cached head, {e} ep": cached_head(root, e, f"{tmp}/cache-head"),
            }
            os.environ["FINETUNE_CACHE_DIR"] = cache
            rows["linear"] = fit(root, tmp, "linear", strategy="linear")
            rows["linear, warm cache"] = fit(root, tmp, "linear2", strategy="linear")
        base = rows["per-epoch forward"][0]
        for method, (train_s, total, acc) in rows.items():
            print(
                f"{name:<15}{method:<24}{train_s:>9.1f}{total:>9.1f}{acc:>10.3f}"
                f"{base / train_s:>9.1f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
