"""finetune: turn a folder of labelled images into a good image classifier by transfer learning.

>>> import finetune
>>> run = finetune.fit("sample_data/fashion", strategy="linear", epochs=3)
>>> predictor = finetune.load(run.dir)
>>> predictor.predict("sample_data/fashion/test/bag/00035.png")[0].label
"""

from __future__ import annotations

__version__ = "0.1.0"

from finetune.api import FitResult, fit
from finetune.config import FitConfig
from finetune.errors import FinetuneError
from finetune.predict import Prediction, Predictor, load
from finetune.strategies import STRATEGIES

__all__ = [
    "STRATEGIES",
    "FinetuneError",
    "FitConfig",
    "FitResult",
    "Prediction",
    "Predictor",
    "__version__",
    "fit",
    "load",
]
