"""What fit's CPU settings do to a training step: memory layout and glibc's freed memory.

A tf_efficientnet_lite0 training step (forward, backward, AdamW; batch 32, random tensors) at
each size, in four combinations, each in a fresh process (glibc's allocator settings cannot be
undone inside one):

- ``contiguous`` / ``channels_last``: the NCHW layout against NHWC (``--channels-last``, fit's
  default);
- ``malloc default`` / ``freed kept``: glibc as it comes against
  ``finetune.training.compute.keep_freed_memory`` (which fit applies on a CPU).

Prints images/s (the median step after 3 of warm-up) and the peak resident memory.

    python benchmarks/cpu_settings.py [--sizes 64 128 224] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = """
import json, os, resource, statistics, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import torch.nn.functional as F
from finetune.training.compute import keep_freed_memory
from finetune.model.backbone import create_backbone, create_classifier

size, steps, nhwc, kept = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
if kept:
    keep_freed_memory()
layout = torch.channels_last if nhwc else torch.contiguous_format
model = create_classifier(create_backbone("tf_efficientnet_lite0"), 10).train()
model.to(memory_format=layout)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randn(32, 3, size, size).contiguous(memory_format=layout)
y = torch.randint(0, 10, (32,))
times = []
for _ in range(steps + 3):
    start = time.perf_counter()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"rate": 32 / statistics.median(times[3:]), "peak": peak}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    combos = [
        ("contiguous", "malloc default", 0, 0),
        ("channels_last", "malloc default", 1, 0),
        ("contiguous", "freed kept", 0, 1),
        ("channels_last", "freed kept", 1, 1),
    ]
    print(f"tf_efficientnet_lite0 training step, batch 32, cpu ({os.cpu_count()} cores)")
    print(f"{'px':>4}  {'layout':<14}{'allocator':<16}{'img/s':>7}  {'vs first':>8}  peak MiB")
    for size in args.sizes:
        first = None
        for layout, allocator, nhwc, kept in combos:
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(size), str(args.steps), str(nhwc), str(kept)],
                capture_output=True, text=True, check=True, env=env,
            ).stdout  # fmt: skip
            r = json.loads(out.strip().splitlines()[-1])
            first = first or r["rate"]
            print(f"{size:>4}  {layout:<14}{allocator:<16}{r['rate']:7.1f}  "
                  f"{r['rate'] / first:7.2f}x  {r['peak']:8.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
