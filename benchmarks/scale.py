"""``finetune fit`` on 10,000 images: peak host memory and where the time goes.

Builds a folder-per-class tree of N Fashion-MNIST training images (N / 10 per class, random
80/20 train/val split by fit), then runs the real command once per strategy, each in a fresh
process with an empty cache (the worst case: every file scanned, decoded and cached):

    finetune fit DATA --strategy S --epochs E --log-format json --out ...

A thread samples the resident memory (VmRSS) of the process and all of its children (DataLoader
workers included) every 50 ms; the peak of the sum is reported, against issue 8's 4 GB bound.
For ``linear``, the time of its one forward pass over the data (the "features" line) is set
against the wall time of the whole command.

    apt-get install dataset-fashion-mnist
    python benchmarks/scale.py [--images 10000] [--strategies linear finetune-all] [--epochs 1]
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
from benchdata import FASHION, FASHION_CLASSES, read_idx  # benchmarks/benchdata.py
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
    env = {**os.environ, "FINETUNE_CACHE_DIR": str(tmp / f"cache-{strategy}")}
    command = [
        sys.executable, "-m", "finetune", "fit", str(data), "--strategy", strategy,
        "--epochs", str(epochs), "--log-format", "json", "--out", str(tmp / strategy),
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
        "lines": [m for m in messages if m.startswith(("data", "cache", "features", "size"))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--strategies", nargs="+", default=["linear", "finetune-all"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data"))
    args = parser.parse_args()
    data = build(args.data / f"fashion-{args.images}", args.images)
    print(f"{args.images:,} Fashion-MNIST images, {os.cpu_count()} cores, cold caches")
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies:
            r = run(data, strategy, args.epochs, Path(tmp))
            print(f"\n{strategy}: wall {r['wall']:.0f} s, peak host memory (process tree) "
                  f"{r['peak'] / 1024**3:.2f} GiB (bound: 4 GB)")  # fmt: skip
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
