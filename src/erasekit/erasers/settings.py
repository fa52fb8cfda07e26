"""Method settings: typed dataclasses with model-dependent defaults, validation, and ``--set key=value`` parsing.

Every method declares one `Settings` subclass. Its fields are the knobs a user may change; a field's type
(bool, int, float, str, or Optional of those) says how a ``--set`` string is parsed, and
``field(metadata={"choices": (...)})`` restricts a string to a few values. ``for_pipeline`` gives the defaults
for one model (the embedded world is small and wants other defaults than Stable Diffusion), ``validate`` checks
ranges. The resolved settings are recorded in every saved edit.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, Sequence

from erasekit.errors import ErasekitError

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
            raise ErasekitError(f"--set {pair!r}: expected key=value")
        if key in out:
            raise ErasekitError(f"--set {key} given twice")
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
            value = float(raw)
        elif base is int and isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        elif isinstance(raw, base):
            value = raw
        else:
            raise ErasekitError(f"setting {key}={raw!r}: must be {TYPE_WORDS.get(base, base.__name__)}")
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
                if value != value:  # NaN
                    raise ValueError
            else:
                value = raw
        except ValueError:
            raise ErasekitError(f"--set {key}={raw}: {key} must be {TYPE_WORDS.get(base, base.__name__)}") from None
    if choices and value not in choices:
        raise ErasekitError(f"--set {key}={value}: {key} must be one of {', '.join(map(str, choices))}")
    return value


@dataclasses.dataclass
class Settings:
    """Base class of every method's settings."""

    @classmethod
    def for_pipeline(cls, pipe) -> "Settings":
        """The defaults for ``pipe`` (override for model-dependent defaults)."""
        return cls()

    def validate(self) -> None:
        """Raise `ErasekitError` for values out of range (override)."""

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
                raise ErasekitError(f"unknown setting {key!r} for this method; known: {', '.join(fields)}")
            out[key] = _parse(key, raw, hints[key], fields[key].metadata.get("choices"))
        return out

    def replace(self, overrides: Mapping[str, Any]) -> "Settings":
        new = dataclasses.replace(self, **self.parse(overrides))
        new.validate()
        return new

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Settings":
        """Rebuild recorded settings (keys this version does not know are ignored)."""
        known = set(cls.keys())
        return cls(**{k: v for k, v in values.items() if k in known})


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
