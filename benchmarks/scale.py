"""``finetune fit`` on 10,000 images: peak host memory and where the time goes.

Builds a folder-per-class tree of N Fashion-MNIST training images (N / 10 per class, random
80/20 train/val split by fit), then runs the real command once per strategy, each in a fresh
process with an empty cache (the worst case: every file scanned, decoded and cached):

    finetune fit DATA --strategy S --epochs E --log-format json --out ...

A thread samples the resident memory (VmRSS) of the process and all of its children (DataLoader
workers included) every 50 ms; the peak of the sum is reported, against issue 8's 4 GB bound.
For ``linear``, the time of its one forward pass over the data (the "features" line) is set
against the wall time of the whole command. Fashion-MNIST's 28 px images train at 64 px, where
a forward pass is cheap; ``--photos N`` adds ``linear`` on N camera-like 640x480 JPEGs
(benchdata.photo_files, 7 classes) at the model's native 224 px, the usual case for photos.

    apt-get install dataset-fashion-mnist
    python benchmarks/scale.py [--images 10000] [--strategies linear finetune-all] [--epochs 1]
                               [--photos 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from benchdata import FASHION, FASHION_CLASSES, photo_files, read_idx  # benchmarks/
from PIL import Image


def build(root: Path, images: int) -> Path:
    """``images`` Fashion-MNIST training images as PNGs, one folder per class."""
    if root.is_dir():
        return root
    x = read_idx(FASHION / "train-images-idx3-ubyte.gz")
    y = read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    for label, name in enumerate(FASHION_CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in np.flatnonzero(y == label)[: images // len(FASHION_CLASSES)]:
            Image.fromarray(x[i]).save(folder / f"{i:05d}.png")
    return root


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        total += int(match.group(1)) * 1024 if match else 0
    return total


def run(data: Path, strategy: str, epochs: int, tmp: Path) -> dict:
    name = f"{data.name}-{strategy}"
    env = {**os.environ, "FINETUNE_CACHE_DIR": str(tmp / f"cache-{name}")}
    command = [
        sys.executable, "-m", "finetune", "fit", str(data), "--strategy", strategy,
        "--epochs", str(epochs), "--log-format", "json", "--out", str(tmp / name),
    ]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], _tree_rss(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log = process.stderr.read()
    process.wait()
    sampler.join()
    wall = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{log}")
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    messages = [e["text"] for e in events if e["event"] == "message"]
    features = next((m for m in messages if m.startswith("features")), "")
    seconds = re.search(r"in ([\d.]+) s", features)
    return {
        "strategy": strategy,
        "wall": wall,
        "peak": peak[0],
        "features": float(seconds.group(1)) if seconds else None,
        "epochs": [e["seconds"] for e in events if e["event"] == "epoch"],
        "lines": [
            m for m in messages if m.startswith(("data", "model", "cache", "features", "size"))
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--strategies", nargs="+", default=["linear", "finetune-all"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data"))
    parser.add_argument("--photos", type=int, default=0, help="also linear on N 640x480 JPEGs")
    args = parser.parse_args()
    data = build(args.data / f"fashion-{args.images}", args.images)
    cases = [(data, strategy) for strategy in args.strategies]
    if args.photos:
        per_class = args.photos // 7  # 7 source photos, 80/20 train/val
        photos = photo_files(
            args.data / f"photos-640x480-{per_class}", (per_class * 4 // 5, per_class // 5),
            640, 480,
        )  # fmt: skip
        cases.append((photos, "linear"))
    print(f"{args.images:,} Fashion-MNIST images, {os.cpu_count()} cores, cold caches")
    with tempfile.TemporaryDirectory() as tmp:
        for folder, strategy in cases:
            r = run(folder, strategy, args.epochs, Path(tmp))
            print(f"\n{folder.name}, {strategy}: wall {r['wall']:.0f} s, peak host memory "
                  f"(process tree) {r['peak'] / 1024**3:.2f} GiB (bound: 4 GB)")  # fmt: skip
            for line in r["lines"]:
                print(f"  {line}")
            if r["features"] is not None:
                share = r["features"] / r["wall"]
                print(
                    f"  the forward pass: {r['features']:.0f} s of {r['wall']:.0f} s ({share:.0%})"
                )
            if r["epochs"]:
                print("  epoch seconds: " + ", ".join(f"{s:.0f}" for s in r["epochs"]))


if __name__ == "__main__":
    main()
