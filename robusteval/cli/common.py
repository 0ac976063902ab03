"""Helpers shared by the CLI commands: ε parsing, device choice, error reporting."""

from __future__ import annotations

import math
import re
from fractions import Fraction

from robusteval.errors import UserError
from robusteval.runtime import resolve_device  # noqa: F401 — the commands' import point

_NUM = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"


def parse_eps(text: str, scale: float = 1.0, norm: str = "linf") -> float:
    """Parse an ε given on the command line: ``8/255``, ``0.031`` or ``8`` (with ``scale=255``).

    The result is in pixel units (docs/protocol.md, "Units"); an L∞ radius is at most 1. Anything else —
    a negative value, NaN, a division by zero, a value above 1 after scaling — is a
    :class:`UserError`.
    """
    s = str(text).strip()
    m = re.fullmatch(rf"({_NUM})\s*/\s*({_NUM})", s)
    try:
        if m:
            den = float(m.group(2))
            if den == 0:
                raise UserError(f"invalid epsilon {text!r}: division by zero")
            value = float(Fraction(m.group(1)) / Fraction(m.group(2)))
        elif re.fullmatch(_NUM, s):
            value = float(s)
        else:
            raise UserError(f"invalid epsilon {text!r}: expected a number like 0.031, 8/255, "
                            "or 8 with --eps-scale 255")
    except (ValueError, ZeroDivisionError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"invalid epsilon {text!r}") from None
    if not scale or not math.isfinite(scale) or scale <= 0:
        raise UserError(f"invalid --eps-scale {scale!r}: must be a positive number")
    value = value / scale
    if not math.isfinite(value) or value < 0:
        raise UserError(f"invalid epsilon {text!r}: must be a non-negative number")
    if value > 1 and norm == "linf":
        raise UserError(
            f"epsilon {text!r} is {value:g} in [0,1] pixel units, larger than the whole image range; "
            "did you mean --eps-scale 255?"
        )
    return value


def parse_step_size(text: str | None) -> tuple[float, bool] | None:
    """Parse ``--step-size``: ``0.1`` (absolute, pixel units) or ``0.25eps`` (relative to ε).

    Returns ``(value, relative)`` or ``None`` when not given.
    """
    if text is None:
        return None
    s = str(text).strip().lower()
    relative = s.endswith("eps")
    if relative:
        s = s[:-3].strip().rstrip("*") or "1"
    try:
        value = float(Fraction(s)) if "/" in s else float(s)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"invalid step size {text!r}: expected e.g. 0.01 or 0.25eps") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"invalid step size {text!r}: must be positive")
    return value, relative

