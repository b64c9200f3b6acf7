"""Prediction speed on CPU: the eager model (``finetune.load(run_dir)``, channels_last by
default) against the same model in the contiguous NCHW layout (``eager NCHW``) and against its
TorchScript and ONNX exports (``finetune.export``; ONNX runs through onnxruntime), side by side,
one run.

    python benchmarks/predict.py [--image-size 224] [--repeats 7] [--batch-sizes 1 32]

It trains a run with ``strategy="linear"`` (a few seconds) on ``--data`` (default the shipped
sample data) in a temporary folder, exports it twice, loads all three with ``finetune.load`` on
the CPU and classifies the same images (``<data>/test``, 100 for the sample data) with each.

Two measurements per path and batch size, both over all the images in batches of that size
(the last batch may be smaller, as in ``predict``):
- ``model img/s``: the predictor's ``.model`` alone on tensors decoded and preprocessed
  beforehand (under ``torch.inference_mode``): what the export changes.
- ``e2e img/s``: ``Predictor.predict`` on the image files: decode + preprocess + model +
  softmax/top-k, what a user sees.

Each timing is the median over ``--repeats`` passes after two warm-up passes; the three paths
take turns within each repeat, so background load hits them alike, with a short pause before
each pass so that the previous path's spinning worker threads do not slow the next. ``±%`` is
half the range of the repeats over the median; ``vs eager`` is the path's median over the eager
one; ``model share`` is the part of the end-to-end time spent in the model (e2e img/s over
model img/s). Other work on the machine skews all of it, wildly (with a test suite running beside
it on 2 cores the eager model ran up to 70x slower at batch 1): the header says how much of the
CPUs other processes used during the run.

The parity table checks that the top-1 class of every image agrees with eager (and gives the
largest difference in any class probability) for each path and batch size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnxruntime
import torch

import finetune
from finetune.data.images import load_image
from finetune.data.transforms import eval_transform
from finetune.inference.export import export
from finetune.inference.predict import Predictor, expand_inputs

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 2  # passes before timing; TorchScript's profiling executor optimises on the 2nd call
# Pause before each timed pass: OpenMP (torch) and onnxruntime keep their worker threads
# spinning for a while after a call, and on 2 cores that slowed the path timed next by 10-45%.
SETTLE_S = 0.3


def build_paths(data: Path, image_size: int | None, tmp: str) -> dict[str, Path]:
    """Train a linear-probe run and export it; the three things ``finetune.load`` is given."""
    options = {"image_size": image_size} if image_size else {}
    run = finetune.fit(
        data, strategy="linear", out=f"{tmp}/run", verbose=False, feature_cache=False, **options
    )
    return {
        "eager": run.dir,
        "torchscript": export(run.dir, "torchscript", out=f"{tmp}/model.torchscript.pt"),
        "onnx": export(run.dir, "onnx", out=f"{tmp}/model.onnx"),
    }


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds used by every process since boot, by this one), or None off Linux."""
    try:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    ours = os.times()
    return (
        (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
        ours.user + ours.system,
    )


def others_share(start: tuple[float, float] | None, wall: float) -> str:
    """What share of the machine other processes (and the hypervisor) took since ``start``."""
    end = cpu_seconds()
    if start is None or end is None:
        return "CPU use of other processes unknown"
    share = ((end[0] - start[0]) - (end[1] - start[1])) / (wall * (os.cpu_count() or 1))
    verdict = "; rerun on an idle machine" if share > 0.05 else ""
    return f"other processes used {max(share, 0):.0%} of the CPUs{verdict}"


def timed(
    fns: dict[str, Callable[[], object]], n_images: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """(median images/s, half-range in % of the median) per entry; entries take turns."""
    for fn in fns.values():
        for _ in range(WARMUP):
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    result = {}
    for name, times in seconds.items():
        rates = n_images / np.array(times)
        median = float(np.median(rates))
        result[name] = (median, 50 * float(rates.max() - rates.min()) / median)
    return result


def model_only(predictor: Predictor, batches: list[torch.Tensor]) -> Callable[[], None]:
    layout = torch.channels_last if predictor.channels_last else torch.contiguous_format
    batches = [x.contiguous(memory_format=layout) for x in batches]  # converted untimed

    def run() -> None:
        with torch.inference_mode():
            for x in batches:
                predictor.model(x)

    return run


def end_to_end(predictor: Predictor, paths: list[Path], batch_size: int) -> Callable[[], None]:
    return lambda: predictor.predict(paths, batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "sample_data" / "fashion")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input side; default the run's own (64 for the sample data)",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    if args.repeats < 1 or min(args.batch_sizes) < 1:
        parser.error("--repeats and --batch-sizes must be at least 1")
    warnings.simplefilter("ignore")
    test = args.data / "test"
    paths = expand_inputs([test if test.is_dir() else args.data])
    n = len(paths)
    started, usage = time.perf_counter(), cpu_seconds()

    with tempfile.TemporaryDirectory() as tmp:
        print("training and exporting...", file=sys.stderr, flush=True)
        built = build_paths(args.data, args.image_size, tmp)
        predictors = {name: finetune.load(path, device="cpu") for name, path in built.items()}
        eager = predictors["eager"]
        # The same eager model in the layout it had before predict ran channels_last.
        contiguous = finetune.load(built["eager"], device="cpu")
        predictors["eager NCHW"] = Predictor(
            contiguous.model.to(memory_format=torch.contiguous_format), contiguous.classes,
            contiguous.preprocessing, "cpu", channels_last=False,
        )  # fmt: skip
        transform = eval_transform(eager.preprocessing)
        x = torch.stack([transform(image=load_image(p))["image"] for p in paths])

        rows: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}
        probs: dict[tuple[str, int], np.ndarray] = {}
        for bs in args.batch_sizes:
            print(f"timing batch size {bs}...", file=sys.stderr, flush=True)
            batches = list(x.split(bs))
            model = timed(
                {k: model_only(p, batches) for k, p in predictors.items()}, n, args.repeats
            )
            e2e = timed(
                {k: end_to_end(p, paths, bs) for k, p in predictors.items()}, n, args.repeats
            )
            for name, predictor in predictors.items():
                rows[name, bs] = {"model": model[name], "e2e": e2e[name]}
                probs[name, bs] = predictor.predict_proba(paths, batch_size=bs)

    others = others_share(usage, time.perf_counter() - started)
    pre = eager.preprocessing
    print(
        f"\n{n} images of {args.data}, input {pre.input_size}x{pre.input_size}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"onnxruntime {onnxruntime.__version__}, median of {args.repeats} repeats;\n"
        f"{others}\n"
    )
    print(
        f"{'path':<13}{'batch':>6}{'model img/s':>13}{'±%':>5}{'vs eager':>10}"
        f"{'e2e img/s':>11}{'±%':>5}{'vs eager':>10}{'model share':>13}"
    )
    for bs in args.batch_sizes:
        base = rows["eager", bs]
        for name in predictors:
            row = rows[name, bs]
            (m, m_spread), (e, e_spread) = row["model"], row["e2e"]
            print(
                f"{name:<13}{bs:>6}{m:>13.1f}{m_spread:>5.0f}{m / base['model'][0]:>9.2f}x"
                f"{e:>11.1f}{e_spread:>5.0f}{e / base['e2e'][0]:>9.2f}x{e / m:>12.0%}"
            )

    ref_bs = args.batch_sizes[-1]
    reference = probs["eager", ref_bs]
    print(f"\nparity with eager at batch {ref_bs} ({n} images):")
    print(f"{'path':<13}{'batch':>6}{'top-1 agree':>13}{'max |Δp|':>11}")
    for (name, bs), p in probs.items():
        agree = f"{int((p.argmax(1) == reference.argmax(1)).sum())}/{n}"
        print(f"{name:<13}{bs:>6}{agree:>13}{float(np.abs(p - reference).max()):>11.1e}")


if __name__ == "__main__":
    main()
