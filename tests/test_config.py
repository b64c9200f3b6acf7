"""FitConfig validation and overrides."""

from __future__ import annotations

import dataclasses

import pytest

from finetune.config import DEFAULT_LR, GROUPS, SETTINGS, FitConfig
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


def test_every_field_is_declared_once_with_help_group_and_flag() -> None:
    names = [f.name for f in dataclasses.fields(FitConfig)]
    assert list(SETTINGS) == names
    for name, meta in SETTINGS.items():
        assert meta.help.strip() and meta.group in GROUPS, name
        assert meta.flag.startswith("--"), name
    assert SETTINGS["batch_size"].flag == "--batch-size"  # derived from the name
    assert SETTINGS["num_workers"].flag == "--workers"  # declared
    assert SETTINGS["optimizer"].choices == tuple(DEFAULT_LR)


def test_help_texts_are_generated_from_the_constants() -> None:
    lr = SETTINGS["lr"].help
    assert all(f"{name} {value:g}" in lr for name, value in DEFAULT_LR.items())
    # warmup_epochs is never chosen by auto: its help promises no "auto's choice"
    assert "auto" not in SETTINGS["warmup_epochs"].help


def test_a_setting_with_an_unknown_group_fails_at_declaration() -> None:
    from finetune.config import setting

    with pytest.raises(ValueError, match="Unknown settings group 'speeed'"):
        setting(1, help="x", group="speeed")
    with pytest.raises(ValueError, match="help text"):
        setting(1, help=" ", group="speed")
