"""Structure spec strings: ``"btt:rank=4,cores=3"`` <-> ``("btt", {"rank": 4, "cores": 3})``.

A spec names a registered structure and, after a colon, its options as comma-separated
``key=value`` pairs. Values are Python literals (``4``, ``0.25``, ``(24, 32)``), ``true``/``false``,
``none``, ``inf``, ``24x32`` for a tuple of ints, or else a bare string (``norm=rms_clamp``).
:func:`format_spec` writes what :func:`parse_spec` reads back.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["format_spec", "parse_spec"]


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if low in ("inf", "+inf"):
        return math.inf
    if "x" in low and all(part.isdigit() for part in low.split("x")):
        return tuple(int(part) for part in low.split("x"))  # "24x32" -> (24, 32)
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def _split_options(text: str) -> list[str]:
    # Commas inside brackets belong to a value: "in_factors=(24,32),rank=2".
    items, depth, cur = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        items.append("".join(cur))
    return [i for i in items if i.strip()]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"btt:rank=4,cores=3"`` into ``("btt", {"rank": 4, "cores": 3})``.

    Values are read as Python literals; ``24x32`` is a tuple of ints; anything else is a string.

    Examples::

        >>> parse_spec("btt:rank=4,in_factors=24x32,norm=rms_clamp")
        ('btt', {'rank': 4, 'in_factors': (24, 32), 'norm': 'rms_clamp'})
        >>> parse_spec("dense")
        ('dense', {})
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"expected a structure spec such as 'btt:rank=4', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    options: dict[str, Any] = {}
    if rest.strip():
        for item in _split_options(rest):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(
                    f"bad option {item!r} in structure spec {spec!r}; expected key=value pairs "
                    f"separated by commas, e.g. 'btt:rank=4,cores=3'"
                )
            options[key.strip()] = _parse_value(value)
    return name.strip(), options


def _format_value(value: Any) -> str:
    if isinstance(value, tuple) and len(value) > 1 and all(type(v) is int for v in value):
        return "x".join(str(v) for v in value)
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return "inf"
    text = value if isinstance(value, str) else repr(value)
    # A string is written bare when it reads back as itself ("rms_clamp"), quoted otherwise.
    if isinstance(value, str) and _parse_value(text) != value:
        text = repr(value)
    return text


def format_spec(structure: str, options: Mapping[str, Any]) -> str:
    """The spec string of ``structure`` with ``options``, the inverse of :func:`parse_spec`.

    Examples::

        >>> format_spec("btt", {"cores": 2, "rank": 4, "in_factors": (24, 32)})
        'btt:cores=2,rank=4,in_factors=24x32'
        >>> parse_spec(format_spec("tt", {"rank": 2, "norm": "rms_clamp"}))
        ('tt', {'rank': 2, 'norm': 'rms_clamp'})
    """
    if not options:
        return structure
    return structure + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in options.items())
