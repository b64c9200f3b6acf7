"""Evidence for auto's similarity measure: the BatchNorm shift, on real datasets of different
character, next to two alternatives, and what each predicts about the best probe stage.

    apt-get install dataset-fashion-mnist   # for the Fashion-MNIST sets
    python benchmarks/similarity.py

For each dataset (benchmarks/benchdata.py, plus uniform noise as the far extreme):

- ``bn shift``: finetune.strategies.measure.batchnorm_shift at the model's native size (what
  auto uses):
  mean KL divergence between the per-channel Gaussian of each BatchNorm layer's input on these
  images and the running statistics stored from ImageNet.
- ``in1k conf``: the pretrained ImageNet classifier's mean top-1 probability, the other
  measurement often suggested; it does not separate the datasets.
- ``head cv`` / ``best stage cv``: cross-validated accuracy of a linear probe on the top features
  and on the best stage (finetune.strategies.logistic): where the shift is large, earlier
  stages win or tie,
  the premise of the "different data" row of the matrix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from benchdata import build  # benchmarks/benchdata.py
from PIL import Image

from finetune.data.features import HEAD, extract_features, probe_points
from finetune.data.loaders import ImageDataset, collate_skipping_failed
from finetune.data.scan import scan_folder
from finetune.data.transforms import Preprocessing, choose_image_size, eval_transform
from finetune.model.backbone import create_backbone
from finetune.strategies.logistic import fit_probe
from finetune.strategies.measure import SIMILAR_BELOW, batchnorm_shift


def noise_folder(root: Path, classes: int = 4, per_class: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"noise{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"noise{c}" / f"{i}.png")
    return root


@torch.inference_mode()
def imagenet_confidence(model: torch.nn.Module, split, pre: Preprocessing) -> float:
    dataset = ImageDataset(split.train[:128], eval_transform(pre))
    images, _ = collate_skipping_failed([dataset[i] for i in range(len(dataset))])
    return float(model.eval()(images).softmax(1).max(1).values.mean())


def main() -> None:
    cpu = torch.device("cpu")
    backbone = create_backbone("tf_efficientnet_lite0")
    classifier = create_backbone("tf_efficientnet_lite0", keep_classifier=True)
    native = Preprocessing.from_model(backbone)
    sets = build(Path(__file__).parent / "data")
    tmp = Path(tempfile.mkdtemp())
    sets["noise"] = noise_folder(tmp / "noise")
    print(f"threshold: similar below a BatchNorm shift of {SIMILAR_BELOW}")
    print(
        f"{'dataset':<15}{'bn shift':>9}{'in1k conf':>10}{'px':>5}{'head cv':>9}"
        f"{'best stage cv':>20}"
    )
    try:
        for name, root in sets.items():
            split = scan_folder(root)
            shift = batchnorm_shift(backbone, split, native, cpu)
            confidence = imagenet_confidence(classifier, split, native)
            side = choose_image_size(native.input_size, split.median_side)
            pre = Preprocessing.from_model(backbone, side)
            # A random 2,000 at most: a stable CV estimate in minutes, every class present.
            order = np.random.default_rng(0).permutation(len(split.train))[:2000]
            train = [split.train[i] for i in sorted(order)]
            feats, _ = extract_features(
                backbone, train, pre, probe_points(backbone), device=cpu, progress=False
            )
            cv = {
                p: fit_probe(feats[p], feats["label"], len(split.classes)).cv_accuracy
                for p in probe_points(backbone)
            }
            best = max(cv, key=cv.get)
            verdict = "similar" if shift < SIMILAR_BELOW else "different"
            print(
                f"{name:<15}{shift:>9.3f}{confidence:>10.3f}{side:>5}{cv[HEAD]:>9.3f}"
                f"{best:>12} {cv[best]:.3f}   -> {verdict}",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
