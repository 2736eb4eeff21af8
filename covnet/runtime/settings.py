"""Settings dataclasses whose fields carry their own help, flag name and limits.

A field declared with ``setting(default, help, ...)`` is described once: ``covnet.cli.settings_flags`` turns it
into a command-line flag (name, type, default and help), ``check_limits`` checks its value and names the flag in
the error, and ``settings_from_json`` reads it back from a ``settings.json`` or a checkpoint. A settings class
calls ``check_limits(self)`` in its ``__post_init__``::

    @dataclass
    class Settings:
        epochs: int = setting(1000, "training epochs", minimum=1)
        initial_lr: float = setting(1e-2, "initial learning rate", flag="--lr", above=0)

        def __post_init__(self):
            check_limits(self)

Limits: ``minimum``/``maximum`` are inclusive, ``above``/``below`` exclusive; ``None`` values are not checked.
"""
from __future__ import annotations

import typing
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any

from covnet.runtime.errors import CovnetError


def setting(default: Any = MISSING, help: str = "", *, flag: str | None = None, aliases: tuple[str, ...] = (),
            minimum: float | None = None, maximum: float | None = None, above: float | None = None,
            below: float | None = None, cli: bool = True, default_factory: Any = MISSING,
            default_text: str | None = None):
    """A dataclass field with its help text, flag (default ``--`` + the name with ``-`` for ``_``), other flag
    names, limits, whether it is a flag at all (``cli``), and how the help shows the default (``default_text``;
    by default the value itself)."""
    metadata = {"help": help, "flag": flag, "aliases": tuple(aliases), "minimum": minimum, "maximum": maximum,
                "above": above, "below": below, "cli": cli, "default_text": default_text}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_name(settings_class, field_name: str) -> str:
    """The command-line flag of a field: its ``flag`` metadata, else ``--field-name``."""
    declared = {item.name: item for item in fields(settings_class)}[field_name]
    return declared.metadata.get("flag") or "--" + field_name.replace("_", "-")


def flag_text(settings_class, field_name: str, value) -> str:
    """How a value is typed on the command line: ``--lr 0.01``, ``--batch-dice`` / ``--no-batch-dice``."""
    flag = flag_name(settings_class, field_name)
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}" if value is not None else f"no {flag}"


def _limit_problem(value, metadata) -> str | None:
    checks = (("minimum", lambda v, limit: v >= limit, "at least"), ("maximum", lambda v, limit: v <= limit, "at most"),
              ("above", lambda v, limit: v > limit, "above"), ("below", lambda v, limit: v < limit, "below"))
    for key, holds, words in checks:
        limit = metadata.get(key)
        if limit is not None and not holds(value, limit):
            return f"must be {words} {limit:g}"
    return None


def check_limits(settings) -> None:
    """A ``CovnetError`` naming the flag of the first field whose value is outside its limits."""
    for item in fields(settings):
        value = getattr(settings, item.name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        problem = _limit_problem(value, item.metadata)
        if problem:
            raise CovnetError(None, f"{flag_name(type(settings), item.name)} {problem}, not {value:g}")


def field_types(settings_class) -> dict[str, Any]:
    """Each field's annotation, resolved (string annotations under ``from __future__ import annotations``)."""
    return typing.get_type_hints(settings_class)


def settings_from_json(settings_class, data: dict):
    """A settings object from its ``dataclasses.asdict`` form (JSON): nested settings and tuples restored,
    unknown keys (from older versions) left out, missing ones at their defaults."""
    types = field_types(settings_class)
    values = {}
    for item in fields(settings_class):
        if item.name not in data:
            continue
        value, kind = data[item.name], types[item.name]
        if is_dataclass(kind) and isinstance(value, dict):
            value = settings_from_json(kind, value)
        elif typing.get_origin(kind) is tuple and isinstance(value, list):
            value = tuple(value)
        values[item.name] = value
    return settings_class(**values)

