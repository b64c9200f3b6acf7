"""finetune: turn a folder of labelled images into a good image classifier by transfer learning.

    >>> import finetune
    >>> run = finetune.fit("sample_data/fashion", strategy="linear", epochs=3)
    >>> predictor = finetune.load(run.dir)
    >>> predictor.predict("sample_data/fashion/test/bag/00018.png")[0].label

The names below are imported from their modules on first use (PEP 562), so that
``finetune --help`` does not wait for torch and timm to load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "fit": "finetune.api",
    "augment_preview": "finetune.api",
    "check": "finetune.api",
    "cache_usage": "finetune.api",
    "clear_cache": "finetune.api",
    "FitResult": "finetune.api",
    "plan": "finetune.api",
    "resume": "finetune.api",
    "lr_find": "finetune.api",
    "Plan": "finetune.api",
    "FitConfig": "finetune.config",
    "load_recipe": "finetune.recipes",
    "write_recipe": "finetune.recipes",
    "tune": "finetune.tuning",
    "TuneResult": "finetune.tuning",
    "Augmentation": "finetune.transforms",
    "FinetuneError": "finetune.errors",
    "export": "finetune.exports",
    "load": "finetune.predict",
    "load_ensemble": "finetune.predict",
    "Ensemble": "finetune.predict",
    "Prediction": "finetune.predict",
    "Predictor": "finetune.predict",
    "STRATEGIES": "finetune.strategies",
    "report": "finetune.reports",
    "list_runs": "finetune.reports",
    "compare": "finetune.reports",
}

__all__ = [
    "STRATEGIES",
    "Augmentation",
    "Ensemble",
    "FinetuneError",
    "FitConfig",
    "FitResult",
    "Plan",
    "Prediction",
    "Predictor",
    "TuneResult",
    "__version__",
    "augment_preview",
    "cache_usage",
    "check",
    "clear_cache",
    "compare",
    "export",
    "fit",
    "list_runs",
    "load",
    "load_ensemble",
    "load_recipe",
    "lr_find",
    "plan",
    "report",
    "resume",
    "tune",
    "write_recipe",
]

if TYPE_CHECKING:
    from finetune.api import (
        FitResult,
        Plan,
        augment_preview,
        cache_usage,
        check,
        clear_cache,
        fit,
        lr_find,
        plan,
        resume,
    )
    from finetune.config import FitConfig
    from finetune.errors import FinetuneError
    from finetune.exports import export
    from finetune.predict import Ensemble, Prediction, Predictor, load, load_ensemble
    from finetune.recipes import load_recipe, write_recipe
    from finetune.reports import compare, list_runs, report
    from finetune.strategies import STRATEGIES
    from finetune.transforms import Augmentation
    from finetune.tuning import TuneResult, tune


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'finetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
