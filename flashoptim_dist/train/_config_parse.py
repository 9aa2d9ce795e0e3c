"""Turning config values as written (YAML/JSON scalars, override strings) into typed fields.

:func:`_coerce` converts one value to a dataclass field's annotated type (``Optional``,
``Union``, ``Literal``, ``tuple``/``list``, bool/int/float/str) or raises :class:`_Bad`;
:func:`_type_desc` words a type for error messages; :func:`_parse_scalar_or_list` parses an
override's text the way YAML would. Split out of :mod:`.config`, which re-exports all of them
and turns ``_Bad`` into a :class:`ConfigError` naming the key. :class:`ConfigError` lives here,
below both :mod:`.config` and :mod:`._config_validate`, which raise it.
"""

from __future__ import annotations

import json
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A configuration problem; the message names the key, the value and what is allowed."""


def _type_desc(tp) -> str:
    """``tp`` in words for an error message (e.g. "one of 'rope', 'learned', or null")."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union:
        rest = [a for a in args if a is not type(None)]
        inner = _type_desc(rest[0]) if len(rest) == 1 else " or ".join(_type_desc(a) for a in rest)
        return f"{inner}, or null"
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} " + "/".join(_type_desc(a) for a in dict.fromkeys(args))
        return "a list of " + _type_desc(args[0])
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class _Bad(Exception):
    """The value does not fit the type; the caller reports key, value and :func:`_type_desc`."""


def _coerce(value: Any, tp) -> Any:
    """Convert ``value`` to type ``tp`` or raise _Bad."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
            raise _Bad()
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except _Bad:
                continue
        raise _Bad()
    if origin is Literal:
        for a in args:
            if value == a and type(value) is type(a):
                return a
        for a in args:  # "24" -> 24, 24.0 -> 24
            try:
                if _coerce(value, type(a)) == a:
                    return a
            except _Bad:
                pass
        raise _Bad()
    if origin in (tuple, list):
        if isinstance(value, str):
            value = _parse_scalar_or_list(value)
        if not isinstance(value, (list, tuple)):
            raise _Bad()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Bad()
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        return origin(_coerce(v, args[0]) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Bad()
    if tp is int:
        if isinstance(value, bool):
            raise _Bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise _Bad() from None
                if f.is_integer():
                    return int(f)
        raise _Bad()
    if tp is float:
        if isinstance(value, bool):
            raise _Bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Bad() from None
        raise _Bad()
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Bad()
    raise _Bad()


def _parse_scalar_or_list(text: str) -> Any:
    """Parse an override value the way YAML would (falls back to JSON, then the raw string)."""
    try:
        import yaml

        return yaml.safe_load(text)
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - not valid YAML: keep the raw string
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text
