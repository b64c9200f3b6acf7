"""Strategies: how much of the pretrained backbone trains (the CS231n lecture 7 matrix).

|                   | little data   | a lot of data  |
|-------------------|---------------|----------------|
| similar images    | linear        | finetune-top   |
| different images  | stage-probe   | finetune-all   |

Each strategy is a class registered under its name (:mod:`finetune.strategies.base`); importing
this package registers all of them: the probes (:mod:`~finetune.strategies.probe`), the
fine-tunes (:mod:`~finetune.strategies.finetune`) and ``auto``
(:mod:`~finetune.strategies.auto`), which measures the data and picks one of the four.
"""

from finetune.strategies.auto import Auto
from finetune.strategies.base import STRATEGIES, FitContext, Strategy, get_strategy, register
from finetune.strategies.finetune import FinetuneAll, FinetuneTop
from finetune.strategies.probe import Linear, StageProbe

__all__ = [
    "STRATEGIES",
    "Auto",
    "FinetuneAll",
    "FinetuneTop",
    "FitContext",
    "Linear",
    "StageProbe",
    "Strategy",
    "get_strategy",
    "register",
]
