"""FitConfig validation and overrides."""

from __future__ import annotations

import dataclasses

import pytest

from finetune.config import FitConfig
from finetune.errors import ConfigError, FinetuneError


def test_overrides_ignore_none_and_reject_unknown_names() -> None:
    base = FitConfig(epochs=3)
    config = FitConfig.from_kwargs(base, lr=None, batch_size=8)
    assert config.epochs == 3 and config.batch_size == 8 and config.lr is None
    with pytest.raises(ConfigError, match=r"epoch.*valid options"):
        FitConfig.from_kwargs(epoch=3)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs"),
        ("batch_size", 0, "batch_size"),
        ("lr", -1.0, "lr"),
        ("val_split", 1.0, "val_split"),
        ("optimizer", "adam2", "sgd, momentum, nesterov, adagrad, rmsprop, adam, adamw"),
        ("image_size", 8, "image_size"),
        ("precision", "fp16", r"Unknown precision 'fp16'; choose one of auto, fp32, bf16"),
    ],
)
def test_invalid_values_name_the_field(field: str, value, message: str) -> None:
    with pytest.raises(FinetuneError, match=message):
        FitConfig(**{field: value})


def test_config_is_frozen_and_json_friendly() -> None:
    config = FitConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3  # type: ignore[misc]
    assert FitConfig(**config.to_dict()) == config
