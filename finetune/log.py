"""Where a run's progress goes: human lines and progress bars, or JSON events, on stderr."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from finetune.config import LOG_FORMATS  # torch-free there: the CLI's --log-format choices
from finetune.errors import ConfigError
from finetune.training.loop import EpochResult

__all__ = ["LOG_FORMATS"]


@dataclass(frozen=True)
class _Log:
    """Where a run's progress goes, always stderr (stdout is for results): human lines and
    progress bars ("text"), one JSON object per line ("json": events "data", "decision",
    "epoch", "summary", and "message" for the other lines), or nothing (not ``verbose``)."""

    verbose: bool = True
    format: str = "text"

    def __post_init__(self) -> None:
        if self.format not in LOG_FORMATS:
            raise ConfigError(
                f"Unknown log format {self.format!r}; choose one of {', '.join(LOG_FORMATS)}."
            )

    @property
    def bars(self) -> bool:
        """Progress bars: text only (tqdm still hides them when stderr is not a terminal)."""
        return self.verbose and self.format == "text"

    def text(self, message: str) -> None:
        """A line that only the text format prints (JSON has it in an event)."""
        if self.verbose and self.format == "text":
            print(message, file=sys.stderr, flush=True)

    def say(self, message: str) -> None:
        """A line for people: printed, or a "message" event."""
        self.text(message)
        self.event("message", text=message)

    def event(self, name: str, **fields: Any) -> None:
        """A JSON line (the json format only); nan and inf become null, as JSON has neither."""
        if self.verbose and self.format == "json":
            line = json.dumps({"event": name, **_finite(fields)}, default=str)
            print(line, file=sys.stderr, flush=True)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _on_epoch(log: _Log, epochs: int) -> Callable[[EpochResult], None]:
    """What fit does with each epoch's result: a line, or an "epoch" event with every field."""

    def on_epoch(r: EpochResult) -> None:
        log.text(_epoch_line(r, epochs))
        log.event("epoch", **dataclasses.asdict(r), epochs=epochs)

    return on_epoch


def _epoch_line(r: EpochResult, epochs: int) -> str:
    ema = r.ema_val_acc == r.ema_val_acc  # not nan
    return (
        f"epoch {r.epoch:>{len(str(epochs))}}/{epochs}  train loss {r.train_loss:.3f} "
        f"acc {r.train_acc:.3f}  val loss {r.val_loss:.3f} acc {r.val_acc:.3f}  "
        f"gap {r.gap:+.3f}  "
        + (f"ema acc {r.ema_val_acc:.3f}{'*' if r.ema_best else ' '}  " if ema else "")
        + (f"lr {r.lr:.2e}  " if r.lr > 0 else "")
        + f"{r.seconds:.1f}s"
        + ("  *" if r.best else "")
    )
