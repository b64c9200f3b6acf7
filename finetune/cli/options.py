"""Click options generated from :class:`~finetune.config.FitConfig`'s field declarations.

Each field declares its help, group and flag once (:func:`finetune.config.setting`); this module
turns that declaration into a ``click.option``, so `fit`, `plan`, `tune` and `lr-find` offer one
option per field with no help text typed twice. Options that are not FitConfig fields
(``--recipe``, ``--quiet``, ``--log-format``...) stay hand-written in
:mod:`finetune.cli.commands`.

How a field becomes an option:

* the flag is the setting's (``--`` + the field name by default); the parameter keeps the
  field's name, so the command's ``**options`` go straight into ``FitConfig.from_kwargs``;
* a bool field's flag says how it parses: ``--ema`` gives True, ``--no-feature-cache`` False,
  ``--hflip/--no-hflip`` either; untyped, the value is ``None`` ("the default, or auto");
* other types come from the annotation (``int``, ``float``, ``str``, a pair of floats), with
  ``click.Choice`` when the setting lists choices;
* a field whose default is not ``None`` shows it (``[default: 32]``); ``None`` defaults are
  explained in the help text itself;
* a number field shows the range it accepts (``[default: 0.9; 0<=x<1]``), declared with the
  setting; FitConfig checks it, so the CLI, recipes and the API give the same message.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click

from finetune.config import SETTINGS, FitConfig, Range

__all__ = ["fit_option", "fit_options"]

_F = TypeVar("_F", bound=Callable[..., Any])


def fit_option(name: str, **overrides: Any) -> Callable[[_F], _F]:
    """The click option of FitConfig field ``name``, generated from its declaration.

    Args:
        name: A FitConfig field.
        **overrides: ``click.option`` keywords that replace the generated ones, for a command
            where the field means something narrower (``check``'s ``--val-split`` help).

    Returns:
        A decorator that adds the option to a click command.

    Raises:
        KeyError: ``name`` is not a FitConfig field (a mistake in the CLI's code).
    """
    meta = SETTINGS[name]
    kind = _field_type(name)
    kwargs: dict[str, Any] = {"help": meta.help}
    if meta.within is not None:
        kwargs.update(cls=_SettingOption, range_text=_range_text(meta.within, kind))
    decls = [meta.flag, name]
    if kind is bool:
        # Untyped flags leave the field to its default: a recipe's value is never overridden.
        if "/" not in meta.flag:
            kwargs["flag_value"] = not meta.flag.startswith("--no-")
        kwargs["default"] = None
    else:
        if meta.choices is not None:
            kwargs["type"] = click.Choice(meta.choices)
        elif typing.get_origin(kind) is tuple:
            kwargs["type"] = typing.get_args(kind)
        else:
            kwargs["type"] = kind
        default = _defaults()[name]
        if default is not None:
            kwargs.update(default=default, show_default=True)
    if meta.metavar is not None:
        kwargs["metavar"] = meta.metavar
    kwargs.update(overrides)
    return click.option(*decls, **kwargs)


def fit_options(
    *, exclude: Iterable[str] = (), groups: Iterable[str] | None = None
) -> Callable[[_F], _F]:
    """One option per FitConfig field, in declaration order (the order ``--help`` lists them).

    Args:
        exclude: Fields the command leaves out (``plan`` has no ``--out``; ``lr-find``'s
            ``--out`` is its plot).
        groups: Only the fields of these :data:`~finetune.config.GROUPS` (``augment-preview``
            takes the augmentation group); ``None``: every group.

    Returns:
        A decorator that adds the options to a click command, above the options decorated
        below it.
    """
    left_out, wanted = set(exclude), None if groups is None else set(groups)
    unknown = left_out - set(SETTINGS)
    if unknown:
        raise KeyError(f"Not FitConfig fields: {', '.join(sorted(unknown))}.")
    names = [
        name
        for name, meta in SETTINGS.items()
        if name not in left_out and (wanted is None or meta.group in wanted)
    ]

    def decorate(command: _F) -> _F:
        for name in reversed(names):  # click lists the last-applied decorator first
            command = fit_option(name)(command)
        return command

    return decorate


class _SettingOption(click.Option):
    """A number field's option: ``--help`` shows the range the setting declares, as click
    shows an ``IntRange``'s (``[default: 0.9; 0<=x<1]``).

    The range is shown, not enforced, here: the one check, with its one message, is
    FitConfig's, for the CLI, recipes and the API alike (click's ranges would also let NaN
    through). Click before 8.2 has no ``get_help_extra``; there the range is just not shown.
    """

    def __init__(self, *args: Any, range_text: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.range_text = range_text

    def get_help_extra(self, ctx: click.Context) -> Any:  # click.types.OptionHelpExtra
        extra = super().get_help_extra(ctx)
        extra["range"] = self.range_text
        return extra


def _range_text(within: Range, kind: Any) -> str:
    """``within`` as click writes a range (``0<=x<1``), or for a pair ``0<min<=max<=1``."""
    x = "min <= max" if typing.get_origin(kind) is tuple else "x"
    return within.notation(x).replace(" ", "")


@functools.cache
def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(FitConfig)}


def _field_type(name: str) -> Any:
    """The field's type without ``None`` (``int | None`` -> ``int``)."""
    hint = _hints()[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(FitConfig)
