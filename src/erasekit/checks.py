"""Range checks for numeric options: one clear `ErasekitError` line per bad value.

``name`` is how the user gave the value (``"--guidance"``, ``"setting lr"``, ``"threshold"``); messages read
``--guidance=nan: must be a finite number``. Every check returns the value converted (float or int), so a call
can wrap the value where it is used: ``guidance = finite("--guidance", guidance, low=0)``.
"""

from __future__ import annotations

import math
import numbers

from erasekit.errors import ErasekitError


def _show(value) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _num(bound) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def _as_float(name: str, value) -> float:
    if isinstance(value, bool) or value is None:
        raise ErasekitError(f"{name}={_show(value)}: must be a number")
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise ErasekitError(f"{name}={_show(value)}: must be a number") from None
    if not isinstance(value, numbers.Real):
        raise ErasekitError(f"{name}={_show(value)}: must be a number")
    try:
        return float(value)
    except (OverflowError, ValueError, TypeError):  # an int too large for a float
        raise ErasekitError(f"{name}={_show(value)}: must be a finite number") from None


def _bounds(name: str, value, shown, low, high, low_open: bool, high_open: bool) -> None:
    if low is not None and (value < low or (low_open and value == low)):
        raise ErasekitError(f"{name}={shown}: must be {'>' if low_open else '>='} {_num(low)}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ErasekitError(f"{name}={shown}: must be {'<' if high_open else '<='} {_num(high)}")


def finite(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> float:
    """``value`` as a float; `ErasekitError` unless it is a finite number in [low, high] (``low_open`` /
    ``high_open``: exclude the bound). Strings are parsed ("2.5"); bools and None are refused."""
    x = _as_float(name, value)
    if not math.isfinite(x):
        raise ErasekitError(f"{name}={_show(value)}: must be a finite number")
    _bounds(name, x, _show(value), low, high, low_open, high_open)
    return x


def positive(name: str, value, *, high: float | None = None) -> float:
    """A finite number > 0 (and <= ``high``)."""
    return finite(name, value, low=0.0, low_open=True, high=high)


def probability(name: str, value, *, low_open: bool = False, high_open: bool = False) -> float:
    """A finite number in [0, 1] (ends excluded as asked)."""
    return finite(name, value, low=0.0, high=1.0, low_open=low_open, high_open=high_open)


def integer(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int; `ErasekitError` unless it is a whole number in [low, high]. Accepts ints, integral
    floats (3.0) and strings of either; refuses bools, None, 2.5, nan and inf."""
    bad = ErasekitError(f"{name}={_show(value)}: must be an integer")
    if isinstance(value, bool) or value is None:
        raise bad
    if isinstance(value, numbers.Integral):
        n = int(value)
    else:
        text = value.strip() if isinstance(value, str) else None
        try:
            n = int(text) if text is not None else None
        except ValueError:
            n = None
        if n is None:
            try:
                x = _as_float(name, text if text is not None else value)
            except ErasekitError:
                raise bad from None
            if not math.isfinite(x) or x != int(x):
                raise bad
            n = int(x)
    _bounds(name, n, _show(value), low, high, False, False)
    return n


def seed(name: str, value) -> int:
    """A seed for `torch.Generator.manual_seed`: an integer in [0, 2**63 - 1]."""
    return integer(name, value, low=0, high=2**63 - 1)
