"""Recipes: small commented TOML files whose top-level keys are :class:`FitConfig` fields.

A recipe is a base configuration that ``finetune fit --recipe FILE`` (and ``plan``, ``tune``)
starts from; options typed on the command line override it. In Python::

    config = finetune.load_recipe("recipes/finetune-top.toml")
    run = finetune.fit("sample_data/fashion", config, epochs=3)  # keyword options override it

``write_recipe`` writes one back: only the fields that differ from the defaults, each with its
field's help (the ``--help`` text, declared once in ``finetune/config.py``) as its comment.
``recipes/`` at the top of the repository holds one recipe per cell of the strategy matrix and two
for speed and accuracy.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import stat
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune.config import SETTINGS, FitConfig
from finetune.errors import ConfigError
from finetune.files import atomic_write

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a dependency there, see pyproject.toml)
    import tomli as tomllib

__all__ = ["MAX_RECIPE_BYTES", "load_recipe", "write_recipe"]

# The largest recipe read: the longest possible recipe (every field set, with its comment) is
# a few KB, so a bigger file is not a recipe (a log, an image, /dev/zero behind a symlink).
MAX_RECIPE_BYTES = 1024 * 1024

_WHERE_LISTED = (
    "a recipe's keys are the fields of finetune.FitConfig, each explained in finetune/config.py "
    "(the same names as the `finetune fit --help` options, with _ for -)"
)


def load_recipe(path: str | Path) -> FitConfig:
    """Read a recipe: a TOML file whose top-level keys are :class:`FitConfig` fields.

    Args:
        path: The ``.toml`` file. Keys left out keep their defaults; TOML has no null, so a
            field cannot be set back to ``None`` from a recipe (leave its key out).

    Returns:
        The :class:`FitConfig` the recipe describes (validated as any FitConfig is).

    Raises:
        ConfigError: The file is missing, not a regular file, over :data:`MAX_RECIPE_BYTES`
            or not valid TOML (the message has the line), sets ``out``, a
            key is not a FitConfig field (with the closest name), or a value has the wrong
            type or is out of range; every message starts with the file.

    Example:
        >>> config = finetune.load_recipe("recipes/fast-cpu.toml")
        >>> config.image_size
        64
    """
    path = Path(path).expanduser()
    text = _read_text(path)
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line L, column C)"
        raise ConfigError(f"{path}: not valid TOML: {exc}.") from exc
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(
            f"{path}: not valid TOML for a recipe: its arrays or tables nest too deep; a "
            "recipe's values are numbers, strings, booleans and pairs of numbers."
        ) from None
    hints = _field_types()
    unknown = [key for key in values if key not in hints]
    if unknown:
        described = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("-", "_"), list(hints), n=1)
            described.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(described)}; "
            f"{_WHERE_LISTED}."
        )
    if "out" in values:  # a shared recipe must not choose where a run writes (or overwrites)
        raise ConfigError(
            f"{path}: a recipe cannot set out (the run folder); remove the key and give "
            "--out on the command line (or out= to finetune.fit)."
        )
    checked = {key: _checked(path, key, value, hints[key]) for key, value in values.items()}
    try:
        return FitConfig(**checked)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def write_recipe(
    path: str | Path, config: FitConfig | Mapping[str, Any], header_comment: str = ""
) -> Path:
    """Write ``config`` as a recipe: the fields that differ from the defaults, one per line,
    each followed by its field's help as a comment (a recipe reads without ``--help`` open).

    Args:
        path: The ``.toml`` file to write (its folder is created).
        config: A :class:`FitConfig`, or a mapping of its fields (``None`` values are left
            out, unknown names raise).
        header_comment: Text for the top of the file, written as ``#`` comment lines.

    Returns:
        ``path``, which :func:`load_recipe` reads back into the same configuration.

    Raises:
        ConfigError: The mapping has an unknown field or an invalid value.
    """
    if not isinstance(config, FitConfig):
        config = FitConfig.from_kwargs(**dict(config))
    defaults = FitConfig()
    lines = [f"# {line}".rstrip() for line in header_comment.strip().splitlines()]
    if lines:
        lines.append("")
    for field in dataclasses.fields(FitConfig):
        value = getattr(config, field.name)
        if value == getattr(defaults, field.name) or field.name == "out":  # never in a recipe
            continue
        lines.append(f"{field.name} = {_toml_value(value)}  # {_comment(field.name)}")
    return atomic_write(Path(path).expanduser(), "\n".join(lines) + "\n")


# --- helpers ------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """The recipe's text: only a regular file (after symlinks) of at most
    :data:`MAX_RECIPE_BYTES` is read, so ``--recipe /dev/zero`` or a FIFO fails at once instead
    of reading forever or blocking (the FIFO is opened non-blocking, and checked again on the
    open file, so one swapped in after the first check is refused too)."""
    missing = f"Recipe {path} not found; recipes/ in the finetune repository has examples."
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise ConfigError(f"Recipe {path} is not a regular file; give a .toml file.")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except OSError as exc:
        raise ConfigError(f"Recipe {path} cannot be read: {exc.strerror or exc}.") from exc
    with os.fdopen(fd, "rb") as f:
        try:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"Recipe {path} is not a regular file; give a .toml file.")
            data = f.read(MAX_RECIPE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"Recipe {path} cannot be read: {exc.strerror or exc}.") from exc
    if len(data) > MAX_RECIPE_BYTES:
        raise ConfigError(
            f"Recipe {path} is over {MAX_RECIPE_BYTES // 1024} KB; a recipe is a few lines of "
            "settings: is it the file you meant?"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Recipe {path} is not UTF-8 text: {exc}.") from exc


def _comment(name: str) -> str:
    """Field ``name``'s help, plus its choices: ``--help`` shows those as ``[a|b]``, a recipe
    has only this comment."""
    meta = SETTINGS[name]
    choices = f" One of: {', '.join(meta.choices)}." if meta.choices else ""
    return meta.help + choices


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(FitConfig)


def _checked(path: Path, key: str, value: Any, hint: Any) -> Any:
    """``value`` as field ``key`` takes it; a ConfigError naming the file if it cannot be."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(hint) if a is not type(None))
    else:
        kind = hint
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if typing.get_origin(kind) is tuple:
        if (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            return (float(value[0]), float(value[1]))
        expected = "two numbers in brackets, e.g. [0.35, 1.0]"
    elif kind is bool:
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "a whole number"
    elif kind is float:
        if number:
            return float(value)
        expected = "a number"
    else:  # str
        if isinstance(value, str):
            return value
        expected = "a string in quotes"
    raise ConfigError(
        f"{path}: {key} must be {expected}, got {_shown(value)}; "
        "leave the key out to use the default."
    )


def _shown(value: Any) -> str:
    """``value`` for a message, as TOML, cut short: a long array would flood the terminal."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list) and any(isinstance(v, list | dict) for v in value):
        return "an array of arrays or tables"
    try:
        text = _toml_value(tuple(value) if isinstance(value, list) else value)
    except ConfigError:  # a date or time (TOML has them; no field takes one)
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _toml_value(value: Any) -> str:
    """``value`` (a scalar, a string or a pair of numbers) written as TOML."""
    if value is None:  # TOML has no null; write_recipe only writes fields that differ
        raise ConfigError("A recipe cannot hold None: leave the key out to use the default.")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # the shortest text that reads back as the same float
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"A recipe cannot hold {value!r} ({type(value).__name__}).")
