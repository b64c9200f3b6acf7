"""Where fit's training loop loses time against the model alone, measured in one process.

The same model and optimizer alternate, in rounds, between training steps on one random
tensor kept in memory (the ceiling of ``throughput.py``'s (a)) and training steps on batches
from ``fit``'s own training loader
(``finetune.strategies.loaders.training_loaders``, the decoded-image
cache warm, the default augmentation). Per round it prints the images/s of each kind of step and
how long the loader took to prepare a batch: on a machine whose speed drifts within minutes,
steps measured side by side, round after round, show whether the real batches make the model
slower and what the batch preparation adds.

    python benchmarks/step_overhead.py [--data benchmarks/data/photos-1600x1200-40] [--size 128]

(``throughput.py`` writes that folder; any folder with train/ works.)
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
import torch.nn.functional as F

from finetune.config import FitConfig
from finetune.data.decoded import DecodedCache
from finetune.data.scan import scan_folder
from finetune.data.transforms import PRESETS, DeviceNormalize, Preprocessing
from finetune.model.backbone import create_backbone, create_classifier
from finetune.strategies.loaders import training_loaders
from finetune.training.compute import keep_freed_memory

NHWC = torch.channels_last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data/photos-1600x1200-40"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    keep_freed_memory()  # as fit does on a CPU
    os.environ["FINETUNE_CACHE_DIR"] = tempfile.mkdtemp()
    split = scan_folder(args.data, progress=False)
    model = create_classifier(create_backbone("tf_efficientnet_lite0"), len(split.classes))
    model.train().to(memory_format=NHWC)
    pre = Preprocessing.from_model(model.backbone, args.size)
    cache = DecodedCache.for_preprocessing(pre)
    cache.fill([*split.train, *split.val], progress=False)
    config = FitConfig(batch_size=32)
    loader, _ = training_loaders(split, pre, config, torch.device("cpu"), PRESETS["default"],
                                 None, cache=cache)  # fmt: skip
    normalize = DeviceNormalize.of(pre)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    random = torch.randn(32, 3, args.size, args.size).to(memory_format=NHWC)
    targets = torch.randint(0, len(split.classes), (32,))

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        return time.perf_counter() - start

    print(f"tf_efficientnet_lite0 at {args.size} px, batch 32, {torch.get_num_threads()} threads; "
          f"{args.data}")  # fmt: skip
    print(f"{'round':>5} {'random img/s':>13} {'loader img/s':>13} {'prepare ms':>11} "
          f"{'prepare share':>14}")  # fmt: skip
    for n in range(1, args.rounds + 1):
        on_random = [step(random, targets) for _ in range(args.steps)]
        loader.batch_sampler.set_epoch(n)
        batches = iter(loader)
        on_real, prepare = [], []
        for _ in range(args.steps):
            start = time.perf_counter()
            x, y = next(batches)
            x = normalize(x.to(memory_format=NHWC))  # uint8 -> float, as the loop does
            prepare.append(time.perf_counter() - start)
            on_real.append(step(x, y))
        random_s, real_s = statistics.median(on_random[1:]), statistics.median(on_real[1:])
        prep = statistics.median(prepare)
        print(f"{n:5d} {32 / random_s:13.1f} {32 / real_s:13.1f} {1000 * prep:11.1f} "
              f"{prep / (prep + real_s):14.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
