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
    "fit": "finetune.pipeline",
    "augment_preview": "finetune.reporting.preview",
    "check": "finetune.pipeline",
    "cache_usage": "finetune.data.caches",
    "clear_cache": "finetune.data.caches",
    "FitResult": "finetune.pipeline",
    "plan": "finetune.pipeline",
    "resume": "finetune.pipeline",
    "lr_find": "finetune.pipeline",
    "Plan": "finetune.pipeline",
    "FitConfig": "finetune.config",
    "load_recipe": "finetune.recipes",
    "write_recipe": "finetune.recipes",
    "tune": "finetune.tuning",
    "TuneResult": "finetune.tuning",
    "Augmentation": "finetune.data.transforms",
    "FinetuneError": "finetune.errors",
    "export": "finetune.inference.export",
    "load": "finetune.inference.predict",
    "load_ensemble": "finetune.inference.predict",
    "Ensemble": "finetune.inference.predict",
    "Prediction": "finetune.inference.predict",
    "Predictor": "finetune.inference.predict",
    "STRATEGIES": "finetune.strategies",
    "report": "finetune.reporting.html",
    "list_runs": "finetune.reporting.runs",
    "compare": "finetune.reporting.runs",
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
    from finetune.config import FitConfig
    from finetune.data.caches import cache_usage, clear_cache
    from finetune.data.transforms import Augmentation
    from finetune.errors import FinetuneError
    from finetune.inference.export import export
    from finetune.inference.predict import Ensemble, Prediction, Predictor, load, load_ensemble
    from finetune.pipeline import FitResult, Plan, check, fit, lr_find, plan, resume
    from finetune.recipes import load_recipe, write_recipe
    from finetune.reporting.html import report
    from finetune.reporting.preview import augment_preview
    from finetune.reporting.runs import compare, list_runs
    from finetune.strategies import STRATEGIES
    from finetune.tuning import TuneResult, tune


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'finetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
