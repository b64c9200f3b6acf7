"""FitConfig validation and overrides."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path

import numpy as np
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
        ("precision", "fp8", r"Unknown precision 'fp8'; choose one of auto, fp32, bf16, fp16"),
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


# --- every number field: finite, in its declared range, whoever builds the config -----------

_ISSUE_VALUES = [
    ("lighting", math.nan),  # every augmented image came out black, exit 0
    ("brightness", math.nan),
    ("contrast", math.nan),
    ("saturation", math.nan),
    ("weight_decay", math.nan),
    ("weight_decay", math.inf),
    ("lr", math.inf),
    ("lr", 1e30),  # trained to NaN and saved it as best.pt
    ("crop_ratio", (1.0, math.inf)),
    ("seed", -1),  # a numpy traceback
    ("lr_warmup_epochs", math.nan),
    ("time_budget", math.inf),
]


@pytest.mark.parametrize(("name", "value"), _ISSUE_VALUES)
def test_non_finite_and_absurd_values_are_refused_naming_option_and_range(
    name: str, value: object
) -> None:
    meta = SETTINGS[name]
    with pytest.raises(ConfigError) as info:
        FitConfig(**{name: value})
    message = str(info.value)
    assert message.startswith(f"{name} must ") and f"(option {meta.flag})" in message
    assert meta.within is not None
    if name in ("crop_ratio",):
        assert meta.within.notation("min <= max") in message
    else:
        assert meta.within.describe("a finite number") in message


def test_every_number_field_declares_a_finite_range() -> None:
    hints = typing.get_type_hints(FitConfig)
    for name, meta in SETTINGS.items():
        numeric = any(k in str(hints[name]) for k in ("int", "float"))
        assert (meta.within is not None) == numeric, name
        if numeric:  # NaN and infinity are never in a range
            assert math.nan not in meta.within and math.inf not in meta.within, name
            assert -math.inf not in meta.within, name


def test_numbers_of_other_types_are_stored_as_plain_json_values() -> None:
    config = FitConfig(epochs=np.int64(3), lr=np.float32(0.5), crop_scale=[0.3, 1])
    assert type(config.epochs) is int and type(config.lr) is float
    assert config.crop_scale == (0.3, 1.0)
    assert json.loads(json.dumps(config.to_dict(), allow_nan=False)) == config.to_dict()
    with pytest.raises(ConfigError, match=r"epochs must be a whole number, got 2.5"):
        FitConfig(epochs=2.5)
    with pytest.raises(ConfigError, match=r"ema must be true or false, got 'yes'"):
        FitConfig(ema="yes")
    with pytest.raises(ConfigError, match=r"batch_size cannot be None \(option --batch-size\)"):
        FitConfig(batch_size=None)
    with pytest.raises(ConfigError, match="must be a FitConfig"):
        FitConfig.from_kwargs({"lr": 0.1})  # type: ignore[arg-type]


# Values a careless or hostile user gives: non-finite, negative, zero, huge, of the wrong type.
_ODD_VALUES: list[object] = [
    math.nan, math.inf, -math.inf, -1, -1e-9, 0, 0.0, 1, 2, 0.5, 1.0, 0.999, 31, 32, 64,
    1e30, -1e30, 1e-300, 10**30, 2**32 - 1, 2**32, 2**64, -(2**63), 10**400,
    "3", "nan", "", "adamw", "cosine", [1], [0.5, 1.0], [1, math.inf], (0.2, 0.1), (),
    None, True, False, {"a": 1}, b"1", 1j, object(),
]  # fmt: skip


def _random_value(rng: np.random.Generator, name: str) -> object:
    """For field ``name``: an odd value, a random float across magnitudes, a random int
    (huge ones included), a pair of those, or a value the field accepts (a third of the time,
    so that mixes of valid and invalid fields are common)."""
    kind = rng.integers(0, 9)
    if kind <= 2:
        return _ODD_VALUES[rng.integers(0, len(_ODD_VALUES))]
    if kind == 3:
        return float(rng.uniform(-2, 2) * 10.0 ** rng.integers(-6, 12))
    if kind == 4:
        return int(rng.integers(-5, 6)) * 10 ** int(rng.integers(0, 24))
    if kind == 5:
        return (_random_value(rng, name), _random_value(rng, name))
    return _accepted(rng, name)


def _accepted(rng: np.random.Generator, name: str) -> object:
    """A random value of field ``name``'s type, within its range or among its choices."""
    meta, hint = SETTINGS[name], typing.get_type_hints(FitConfig)[name]
    if meta.choices:
        return meta.choices[rng.integers(0, len(meta.choices))]
    if meta.within is None:
        return bool(rng.integers(0, 2)) if "bool" in str(hint) else getattr(FitConfig(), name)
    low = meta.within.low if meta.within.low is not None else 0
    high = meta.within.high if meta.within.high is not None else low + 100
    if "tuple" in str(hint):
        pair = sorted(float(v) for v in rng.uniform(low, high, size=2))
        return (max(pair[0], 1e-3), max(pair[1], 1e-3))
    if "int" in str(hint):
        return int(rng.integers(int(low), int(high) + 1))
    return float(rng.uniform(low, high)) or 0.5 * high


def _assert_valid(config: FitConfig) -> None:
    """What a config that FitConfig accepted promises: every number finite, of its declared
    type and in its range; its JSON (config.json, strict: no NaN) reads back equal."""
    hints = typing.get_type_hints(FitConfig)
    for name, meta in SETTINGS.items():
        value = getattr(config, name)
        if value is None or meta.within is None:
            continue
        for number in value if isinstance(value, tuple) else (value,):
            assert type(number) in (int, float) and number in meta.within, (name, value)
        if "int" in str(hints[name]):
            assert type(value) is int, (name, value)
    text = json.dumps(config.to_dict(), allow_nan=False)
    assert FitConfig(**json.loads(text)) == config


def test_random_option_values_give_a_valid_config_or_a_clean_error() -> None:
    rng = np.random.default_rng(19)
    names = list(SETTINGS)
    outcomes = {"valid": 0, "refused": 0}
    for _ in range(600):
        picked = rng.choice(names, size=rng.integers(1, 4), replace=False)
        options = {str(name): _random_value(rng, str(name)) for name in picked}
        try:
            config = FitConfig(**options)
        except FinetuneError as exc:  # never a TypeError, OverflowError, ...
            message = str(exc)
            assert "\n" not in message and any(n in message for n in options), (options, message)
            outcomes["refused"] += 1
        else:
            _assert_valid(config)
            outcomes["valid"] += 1
    assert min(outcomes.values()) > 100, outcomes  # both sides were exercised


def test_random_recipe_values_give_a_valid_config_or_a_clean_error(tmp_path: Path) -> None:
    from finetune.recipes import load_recipe

    rng = np.random.default_rng(3)
    toml_values = ["nan", "inf", "-inf", "+inf", "-1", "0", "1", "0.5", "1e30", "-1e30",
                   "99999999999999999999", "4294967296", '"abc"', '""', "[1]", "[0.5, 1.0]",
                   "[1, inf]", "[nan, 1]", "true", "{a = 1}", "1979-05-27", "[[1, 2]]"]  # fmt: skip
    path = tmp_path / "r.toml"
    for _ in range(200):
        name = str(rng.choice(list(SETTINGS)))
        path.write_text(f"{name} = {toml_values[rng.integers(0, len(toml_values))]}\n")
        try:
            config = load_recipe(path)
        except FinetuneError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc), str(exc)
        else:
            _assert_valid(config)


def _cli_words(rng: np.random.Generator, name: str) -> str:
    """A value of field ``name`` as typed on a command line (a pair's first number)."""
    value = _random_value(rng, name)
    return str(value[0] if isinstance(value, tuple) and len(value) == 2 else value)


def test_random_cli_values_exit_with_one_clean_error_line(tmp_path: Path) -> None:
    """`finetune plan` on a folder that does not exist: a config FitConfig accepts gets as far
    as the folder ("is not a folder"), any other fails on the option, never with a traceback."""
    from click.testing import CliRunner

    from finetune.cli.commands import cli

    options = {
        name: meta
        for name, meta in SETTINGS.items()
        if name != "out" and typing.get_type_hints(FitConfig)[name] not in (bool, bool | None)
    }
    rng = np.random.default_rng(7)
    runner = CliRunner()
    missing = str(tmp_path / "no-such-folder")
    for _ in range(300):
        picked = [str(n) for n in rng.choice(list(options), size=rng.integers(1, 3), replace=False)]
        args = ["plan", missing]
        for name in picked:
            arity = 2 if name in ("crop_scale", "crop_ratio") else 1
            args += [options[name].flag, *(_cli_words(rng, name) for _ in range(arity))]
        result = runner.invoke(cli, args)
        assert result.exit_code in (1, 2), (args, result.output)
        assert isinstance(result.exception, SystemExit), (args, result.exception)
        assert "Traceback" not in result.output, args
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, (args, result.output)
        if "is not a folder" not in errors[0]:  # refused: the message names the option
            named = [n for n in picked if options[n].flag in errors[0] or n in errors[0]]
            assert named, (args, errors[0])
