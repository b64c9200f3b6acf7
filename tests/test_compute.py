"""Number format, memory layout, compilation and the batch-size search (on CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from finetune.errors import ConfigError
from finetune.training.compute import (
    check_compile,
    cuda_step_fits,
    largest_batch,
    resolve_channels_last,
    resolve_precision,
)

CPU = torch.device("cpu")


def _memory(capacity: int):
    """A stand-in for a GPU: a batch fits when it is at most ``capacity``; records the asks."""
    asked: list[int] = []

    def fits(batch: int) -> bool:
        asked.append(batch)
        return batch <= capacity

    return fits, asked


def test_the_batch_doubles_while_it_fits_and_stays_under_the_limit() -> None:
    fits, asked = _memory(300)
    assert largest_batch(fits, 32, 1024) == 256
    assert asked == [32, 64, 128, 256, 512]  # stops at the first batch that does not fit
    fits, asked = _memory(10_000)
    assert largest_batch(fits, 32, 400) == 256  # 512 would pass the 400 training images
    assert asked == [32, 64, 128, 256]
    fits, _ = _memory(10_000)
    assert largest_batch(fits, 64, 40) == 64  # a start above the limit is kept when it fits


def test_a_batch_that_does_not_fit_is_halved_until_one_does() -> None:
    fits, asked = _memory(20)
    assert largest_batch(fits, 64, 1024) == 16
    assert asked == [64, 32, 16]
    fits, _ = _memory(0)
    assert largest_batch(fits, 8, 1024) == 0  # nothing fits: the caller says so
    with pytest.raises(ConfigError, match="at 1 image or more, got 0"):
        largest_batch(fits, 0, 1024)


def test_auto_precision_is_fp32_on_cpu_and_bf16_is_kept_when_asked() -> None:
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("fp32", CPU) == "fp32"
    with pytest.warns(UserWarning, match="fp16 on a CPU: CPUs emulate float16"):
        assert resolve_precision("fp16", CPU) == "fp16"


# bf16 from Ampere (8.x) on; fp16 with tensor cores but no bf16 (V100 7.0, T4 7.5); else fp32
@pytest.mark.parametrize(("capability", "auto"), [((8, 0), "bf16"), ((9, 0), "bf16"),
                                                 ((7, 5), "fp16"), ((7, 0), "fp16"),
                                                 ((6, 1), "fp32")])  # fmt: skip
def test_auto_precision_on_cuda_is_bf16_where_the_gpu_computes_in_it(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], auto: str
) -> None:
    # No GPU here: torch.cuda's answers about one are stood in for.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    cuda = torch.device("cuda:1")
    assert resolve_precision("auto", cuda) == auto
    assert resolve_precision("fp32", cuda) == "fp32"
    assert resolve_precision("fp16", cuda) == "fp16"
    if auto != "bf16":
        major, minor = capability
        with pytest.raises(
            ConfigError, match=rf"\(compute capability {major}.{minor}\).*fp16 .*or fp32"
        ):
            resolve_precision("bf16", cuda)
    else:
        assert resolve_precision("bf16", cuda) == "bf16"


def test_the_cuda_step_probe_says_what_fits_and_leaves_the_model_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No GPU here: the model runs on the CPU, torch.cuda's memory accounting is stood in for.
    # 100 bytes of a 1000-byte GPU per image; more than 16 images run out of memory.
    peak = [0]
    for name, stand_in in {
        "get_device_properties": lambda device: SimpleNamespace(total_memory=1000),
        "reset_peak_memory_stats": lambda device: peak.__setitem__(0, 0),
        "max_memory_allocated": lambda device: peak[0],
        "synchronize": lambda device: None,
        "empty_cache": lambda: None,
    }.items():
        monkeypatch.setattr(torch.cuda, name, stand_in)

    class Greedy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if len(x) > 16:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
            peak[0] = 100 * len(x)
            assert x.is_contiguous(memory_format=torch.channels_last)
            return self.head(self.bn(self.conv(x)).mean((2, 3)))

    model = Greedy().eval()
    statistics = model.bn.running_mean.clone()
    fits = cuda_step_fits(model, 8, CPU, amp=torch.bfloat16, channels_last=True, share=0.85)
    assert [fits(batch) for batch in (4, 8, 16, 32)] == [True, True, False, False]
    assert largest_batch(fits, 2, 1024) == 8  # 16 images would take 1600 of 850 bytes allowed
    assert not model.training and torch.equal(model.bn.running_mean, statistics)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)  # as it trains
    assert all(p.grad is None for p in model.parameters())


def test_channels_last_is_on_by_default_on_cpu_and_an_explicit_choice_is_kept() -> None:
    assert resolve_channels_last(None, CPU) is True
    assert resolve_channels_last(False, CPU) is False


def test_compile_without_a_compiler_says_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no g++, no c++
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"--compile needs a C\+\+ compiler.*install one"):
        check_compile()


_FREED = """
import re, sys
import torch
from finetune.training.compute import keep_freed_memory

def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024

applied = keep_freed_memory() if sys.argv[1] == "keep" else None
base = rss()
block = torch.ones(256 * 2**20 // 4)  # 256 MB, every page touched
del block
print(applied, rss() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_keep_freed_memory_keeps_a_freed_block_for_the_next_step() -> None:
    def run(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FREED, mode], capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
        return out[0], int(out[1])

    applied, kept = run("keep")
    assert applied == "True" and kept >= 200  # MB still resident: reused by the next step
    _, returned = run("default")
    assert returned < 50  # glibc's default: the block went back to the OS at once
