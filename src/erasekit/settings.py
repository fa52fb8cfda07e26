"""Component settings: typed dataclasses with validation and ``--set key=value`` parsing.

Every registered component (eraser, defence, attack, probe, detector) declares one `Settings` subclass. Its fields are the knobs a user may change; a field's type
(bool, int, float, str, or Optional of those) says how a ``--set`` string is parsed, and
``field(metadata={"choices": (...)})`` restricts a string to a few values; ``validate`` checks ranges. Defaults that
depend on the model come from its world (`erasekit.worlds`). Resolved settings are recorded with every result.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping, Sequence

from erasekit.errors import ErasekitError
from erasekit.limits import MAX_TEXT_CHARS, shown

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}
TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def parse_set_options(pairs: Sequence[str]) -> dict[str, str]:
    """``["lam=0.1", "tokens=last"]`` -> ``{"lam": "0.1", "tokens": "last"}``; a pair without '=' is an error."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ErasekitError(f"--set {shown(pair)!r}: expected key=value")
        if key in out:
            raise ErasekitError(f"--set {shown(key)} given twice")
        out[key] = value.strip()
    return out


def _base_type(tp) -> tuple[type, bool]:
    """(bool|int|float|str, optional?) for a field annotation."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
    return tp, optional


def _parse(key: str, raw: Any, tp, choices) -> Any:
    base, optional = _base_type(tp)
    if optional and (raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null", ""))):
        return None
    if not isinstance(raw, str):  # a Python value given through the library API
        if base is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            try:
                value = float(raw)
            except OverflowError:  # an int beyond float range
                value = math.inf
            if not math.isfinite(value):
                raise ErasekitError(f"setting {key}={shown(raw)}: must be a finite number")
        elif base is int and isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        elif isinstance(raw, base):
            value = raw
        else:
            raise ErasekitError(f"setting {key}={shown(raw)}: must be {TYPE_WORDS.get(base, base.__name__)}")
    else:
        text = raw.strip()
        try:
            if base is bool:
                if text.lower() not in TRUE_WORDS | FALSE_WORDS:
                    raise ValueError
                value = text.lower() in TRUE_WORDS
            elif base is int:
                value = int(text)
            elif base is float:
                value = float(text)
                if not math.isfinite(value):  # "nan", "inf", "-inf", "1e999"
                    raise ErasekitError(f"--set {key}={shown(raw)}: {key} must be a finite number")
            else:
                value = raw
        except ValueError:
            raise ErasekitError(f"--set {key}={shown(raw)}: {key} must be {TYPE_WORDS.get(base, base.__name__)}") from None
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        from erasekit.limits import setting_bound

        low, high = setting_bound(key)
        if not low <= value <= high:  # bounded before any work (iterations=1e12, epochs=1e9): erasekit.limits
            raise ErasekitError(f"setting {key}={shown(value)}: must be " + (f"<= {high}" if value > high else f">= {low}"))
    if base is str and isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
        raise ErasekitError(f"setting {key}: {len(value)} characters, more than {MAX_TEXT_CHARS}")
    if choices and value not in choices:
        raise ErasekitError(f"--set {key}={shown(value)}: {key} must be one of {', '.join(map(str, choices))}")
    return value


@dataclasses.dataclass
class Settings:
    """Base class of every method's settings."""

    def validate(self) -> None:
        """Raise `ErasekitError` for values out of range (override)."""

    @classmethod
    def _owner(cls) -> str:
        owner = getattr(cls, "owner", "")
        return f" for {owner}" if owner else ""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def parse(cls, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Typed values for ``overrides`` (strings from ``--set`` or Python values); unknown keys are errors.

        Works without a pipeline, so bad input fails before a model is loaded.
        """
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for key, raw in overrides.items():
            if key not in fields:
                raise ErasekitError(f"unknown setting {shown(key)!r}{cls._owner()}; known: {', '.join(fields) or 'none'}")
            out[key] = _parse(key, raw, hints[key], fields[key].metadata.get("choices"))
        return out

    def replace(self, overrides: Mapping[str, Any]) -> "Settings":
        new = dataclasses.replace(self, **self.parse(overrides))
        new.validate()
        return new

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



def choice(default, *choices, help: str = ""):
    """A str field restricted to ``choices``."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices), "help": help})


def positive(settings: Settings, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(settings, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            raise ErasekitError(f"setting {name}={value}: must be {'>= 0' if allow_zero else '> 0'}")
