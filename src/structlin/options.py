"""Validation of user-given options, shared by every place that parses them.

One error style everywhere: the message names where the bad value came from, the bad value, and
the valid choices (with the closest match when a name looks like a typo).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["check_options", "check_positive_int", "suggest"]


def suggest(name: str, valid: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest entry of ``valid``; ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_positive_int(owner: str, name: str, value: Any) -> int:
    """Return ``value`` if it is an ``int`` (not a bool) of at least 1, else raise ``ValueError``.

    ``owner`` starts the message (a layer's name, a config key...), so the user can find the
    value they passed.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return value


def check_options(
    owner: str,
    options: Mapping[str, Any] | Iterable[str],
    valid: Iterable[str],
    *,
    what: str = "option",
) -> None:
    """Raise ``ValueError`` if ``options`` (a mapping or names) has a name not in ``valid``.

    The message lists every unknown name, suggests the closest valid one for the first, and lists
    the valid names, e.g. ``"btt: unknown option(s) ['rnak']; did you mean 'rank'?; valid
    options are: cores, rank, ..."``.
    """
    valid = list(valid)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"{owner}: unknown {what}(s) {unknown}{suggest(unknown[0], valid)}; "
            f"valid {what}s are: {', '.join(valid) if valid else '(none)'}"
        )
