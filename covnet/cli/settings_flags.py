"""Command-line flags derived from a settings dataclass, so that a setting is declared once.

Each field declared with ``covnet.runtime.settings.setting`` becomes one flag: its name (``--`` + the field name
with ``-`` for ``_``, or the field's ``flag``, plus its ``aliases``), its type (from the annotation: ``int``,
``float``, ``str``, or ``X | None``), its help with the dataclass default appended ("default: 250"), and its
limits (checked by the settings class itself, in ``__post_init__``, naming the flag). A ``bool`` field becomes
``--x`` / ``--no-x``. Fields with ``cli=False`` (e.g. nested settings) get no flag. Use::

    parser = argparse.ArgumentParser(prog="covnet_train")
    add_settings_flags(parser, TrainingSettings)
    args = parser.parse_args(argv)
    settings = settings_from_args(TrainingSettings, args)                  # defaults where no flag was given
    settings = settings_from_args(TrainingSettings, args, base=recorded)   # or the recorded run's values

Flags that were not given are absent from ``args`` (``argparse.SUPPRESS``), which is how ``base`` and
``given_settings`` tell a value typed on the command line from a default.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, fields

from covnet.runtime.settings import field_types, flag_name

_FLAG_TYPES = (int, float, str)
_METAVARS = {int: "N", float: "X"}      # strings show the flag's own name


def _value_type(annotation):
    """``int`` for ``int`` or ``int | None`` (``bool | None``: a ``--x`` / ``--no-x`` flag whose absence leaves
    None, "decide for me"); None for types that are no flag (tuples, dataclasses, ...)."""
    if annotation in _FLAG_TYPES or annotation is bool:
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        if len(members) == 1 and (members[0] in _FLAG_TYPES or members[0] is bool):
            return members[0]
    return None


def _default(item: dataclasses.Field):
    return item.default_factory() if item.default is MISSING and item.default_factory is not MISSING \
        else item.default


def _help(item: dataclasses.Field, value_type) -> str:
    metadata = item.metadata
    default = metadata.get("default_text")
    if default is None:
        value = _default(item)
        if value is None or value is MISSING:
            return metadata.get("help", "")
        default = (("on" if value else "off") if value_type is bool else f"{value:g}" if value_type is float
                   else str(value))
    text = metadata.get("help", "")
    return f"{text} (default: {default})" if text else f"default: {default}"


def add_settings_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, settings_class,
                       exclude: tuple[str, ...] = ()) -> None:
    """One flag per field of ``settings_class`` (but those in ``exclude`` and those declared ``cli=False``)."""
    annotations = field_types(settings_class)
    for item in fields(settings_class):
        if item.name in exclude or not item.metadata.get("cli", True):
            continue
        value_type = _value_type(annotations[item.name])
        if value_type is None:
            raise TypeError(f"{settings_class.__name__}.{item.name}: {annotations[item.name]} cannot be a flag; "
                            "declare it with cli=False")
        names = [flag_name(settings_class, item.name), *item.metadata.get("aliases", ())]
        common = {"dest": item.name, "default": argparse.SUPPRESS, "help": _help(item, value_type)}
        if value_type is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
        else:
            parser.add_argument(*names, type=value_type, metavar=_METAVARS.get(value_type), **common)


def given_settings(settings_class, args: argparse.Namespace) -> dict:
    """The settings typed on the command line: field name -> value."""
    given = vars(args)
    return {item.name: given[item.name] for item in fields(settings_class) if item.name in given}


def settings_from_args(settings_class, args: argparse.Namespace, base=None):
    """``settings_class`` with the flags given in ``args``, the other fields from ``base`` (default: the
    class's defaults)."""
    changes = given_settings(settings_class, args)
    return dataclasses.replace(base, **changes) if base is not None else settings_class(**changes)
