"""How a fine-tune runs on its device: number format, memory layout, compilation, batch size.

``fit`` resolves the automatic choices once, before training, and ``config.json`` records what
was used:

- ``precision="auto"``: bf16 on a CUDA GPU that supports it (Ampere and later), fp16 on one
  with tensor cores but no bf16 (Volta, Turing: V100, T4), else fp32. bf16 autocast keeps
  float32's exponent range, so it needs no loss scaling; fp16 trains with a gradient scaler
  (:func:`grad_scaler`). On a CPU both are used only when asked for (:func:`resolve_precision`
  has the measurements).
- ``channels_last=None``: on, on CUDA and on CPU (:func:`resolve_channels_last` has the
  measurements).
- ``compile``: ``torch.compile`` of the training forward needs a C++ compiler
  (:func:`check_compile`).
- ``auto_batch_size``: on CUDA, the largest batch, doubling from ``batch_size``, whose training
  step fits in the GPU's memory (:func:`largest_batch` with :func:`cuda_step_fits`).
- On a CPU, :func:`keep_freed_memory` stops glibc from handing the activations' memory back to
  the operating system after every step, so the next step reuses it instead of faulting it in
  again (the gain is measured in docs/speed.md).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import MAX_AUTO_BATCH  # torch-free there: --auto-batch-size's help
from finetune.errors import ConfigError
from finetune.model.backbone import autocast

__all__ = [
    "KEEP_FREED_BYTES",
    "MAX_AUTO_BATCH",
    "MEMORY_SHARE",
    "autocast_dtype",
    "check_compile",
    "cuda_step_fits",
    "grad_scaler",
    "keep_freed_memory",
    "largest_batch",
    "resolve_channels_last",
    "resolve_precision",
]

# auto_batch_size: a batch fits when its step's peak memory stays below this share of the GPU;
# the rest is for what the probe step leaves out (optimizer state, the weight average,
# torch.compile's buffers) and for fragmentation.
MEMORY_SHARE = 0.85
# keep_freed_memory: blocks up to this size come from (and go back to) the heap, never mmap,
# and the heap is trimmed only when this much is free at its top.
KEEP_FREED_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def resolve_precision(requested: str, device: torch.device) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"``: what ``requested`` ("auto" or one of those) means on
    ``device``.

    On a CPU, bf16 pays only on large inputs and only where the CPU has bfloat16 instructions
    (most have none, and emulate it slowly): even on a CPU that has them it was slower than fp32
    up to 128 px (docs/speed.md, "Measurements behind the defaults"). So auto means fp32 on a
    CPU; bf16 and fp16 are there on request.

    Raises:
        ConfigError: bf16 asked for on a CUDA GPU without bfloat16 support.
    """
    if requested == "auto":
        if device.type != "cuda":
            return "fp32"
        if _native_bf16(device):
            return "bf16"
        # fp16 pays where tensor cores run it (compute capability 7.0+: V100, T4); older GPUs
        # compute fp16 no faster, or far slower, than fp32.
        return "fp16" if torch.cuda.get_device_capability(device)[0] >= 7 else "fp32"
    if requested == "fp16" and device.type == "cpu":
        warnings.warn(
            "--precision fp16 on a CPU: CPUs emulate float16, so a training step runs many times "
            "slower than in fp32 (the tests run it for correctness only); "
            "use fp32 on a CPU.",
            stacklevel=2,
        )
    if requested == "bf16" and device.type == "cuda" and not _native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(
            f"--precision bf16 asked for, but {torch.cuda.get_device_name(device)} (compute "
            f"capability {major}.{minor}) has no bfloat16 arithmetic: it needs 8.0 (Ampere) or "
            "newer. Use --precision fp16 (with a gradient scaler) or fp32."
        )
    return requested


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved ``precision`` ("bf16", "fp16"); None for "fp32"."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 training on ``device``, None otherwise. fp16's smallest
    normal number is 6e-5, so small gradients underflow to zero: the scaler multiplies the loss
    before backward and divides the gradients before the step, skipping a step (and lowering the
    scale) when they overflow."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def _native_bf16(device: torch.device) -> bool:
    """Whether the GPU ``device`` computes in bfloat16 natively (torch's own
    ``is_bf16_supported`` also says yes where it is merely emulated, and asks the current GPU
    rather than ``device``)."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def resolve_channels_last(requested: bool | None, device: torch.device) -> bool:
    """Whether the model and its inputs use the NHWC layout (``requested``, when given).

    On CUDA, NHWC is the layout the tensor cores' convolutions run in. On a CPU, oneDNN's
    convolutions prefer it too: a training step was faster in NHWC at every image size measured
    (docs/speed.md, "Measurements behind the defaults"), so None means on, on both.
    """
    if requested is not None:
        return requested
    return device.type in ("cuda", "cpu")


def check_compile() -> None:
    """Make sure ``torch.compile`` can build kernels here.

    Raises:
        ConfigError: No C++ compiler on PATH (inductor compiles C++ kernels for CPUs and the
            launchers of its Triton kernels for GPUs).
    """
    names = [os.environ.get("CXX", ""), "clang++" if sys.platform == "darwin" else "g++", "c++"]
    if not any(name and shutil.which(name) for name in names):
        raise ConfigError(
            "--compile needs a C++ compiler (torch.compile builds its kernels with one) and "
            "none of $CXX, g++ or c++ is on PATH: install one (e.g. apt install g++) or drop "
            "--compile."
        )


def largest_batch(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest batch that ``fits``: ``start``, doubled while the double is at most
    ``limit`` and fits; or, when ``start`` itself does not fit, halved until it does.

    ``fits`` is assumed monotonic (a batch fits when a larger one does), so the search stops at
    the first failure. Returns 0 when not even a batch of 1 fits.
    """
    if start < 1:
        raise ConfigError(f"The batch search must start at 1 image or more, got {start}.")
    batch = start
    if fits(batch):
        while batch * 2 <= limit and fits(batch * 2):
            batch *= 2
        return batch
    while batch > 1:
        batch //= 2
        if fits(batch):
            return batch
    return 0


def cuda_step_fits(
    model: nn.Module,
    image_size: int,
    device: torch.device,
    *,
    amp: torch.dtype | None,
    channels_last: bool,
    share: float = MEMORY_SHARE,
) -> Callable[[int], bool]:
    """``fits(batch)``: whether a training step of ``model`` (forward under the given
    precision and layout, backward; no optimizer) on ``batch`` random images of
    ``image_size`` px stays below ``share`` of the memory of the CUDA ``device``.

    With ``channels_last`` the model is converted to it first, as training will. Each call
    leaves the model as it found it: mode, buffers (BatchNorm statistics) and gradients (none)
    restored, the freed memory returned to the GPU.
    """
    total = torch.cuda.get_device_properties(device).total_memory
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=torch.channels_last)

    def step(batch: int) -> int:  # its tensors die with it, so the memory can be freed
        images = torch.randn(batch, 3, image_size, image_size, device=device)
        images = images.contiguous(memory_format=layout)
        with autocast(device, amp):
            logits = model(images).float()
            loss = F.cross_entropy(logits, logits.argmax(1))
        loss.backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)

    def fits(batch: int) -> bool:
        was_training = model.training
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        torch.cuda.reset_peak_memory_stats(device)
        model.train()
        try:
            peak = step(batch)
        except torch.cuda.OutOfMemoryError:
            peak = None
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        torch.cuda.empty_cache()
        return peak is not None and peak <= share * total

    return fits


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory in the process instead of returning it to the
    operating system at once. Returns whether it applied (Linux with glibc; elsewhere nothing
    changes).

    A training step on a CPU allocates its activations (gigabytes at 224 px) and frees them
    at the end. By default glibc serves blocks above a (dynamic, at most 32 MB) threshold with
    ``mmap`` and unmaps them when freed, and trims the heap when 128 kB are free at its top,
    so the next step takes a page fault, and a zeroed page from the kernel, for every 4 kB of
    activations again. Raising both thresholds to :data:`KEEP_FREED_BYTES` lets the steps
    reuse the same memory. The gain grows with the activations (none at 64 px, the most at
    224 px) for a few per cent more peak memory: ``benchmarks/cpu_settings.py`` measures it, and
    docs/speed.md has its numbers.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # musl and other C libraries without these parameters return 0: nothing changed.
    trimmed = mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES) == 1
    return mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES) == 1 and trimmed
