"""Which linear layers a surgery touches: a pure function of module names.

:func:`select_targets` decides, from the names alone, what :func:`structlin.structurize` does with
each linear layer, following peft's conventions for ``target_modules``:

* ``"all-linear"``: every linear layer but the output head;
* a list of names: a module matches when its full name equals an entry or ends with
  ``"." + entry`` (a suffix on module-name boundaries);
* any other string: a regular expression that must match the full module name
  (``re.fullmatch``).

``exclude_modules`` takes the same forms and wins over everything. An override pattern (a
name/suffix or a regex) selects the module it names even if ``target_modules`` does not, the
output head included.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = [
    "ALL_LINEAR",
    "EXCLUDED",
    "HEAD",
    "HEAD_NAMES",
    "REPLACE",
    "UNSELECTED",
    "Pattern",
    "TargetDecision",
    "TargetSelection",
    "output_head",
    "select_targets",
]

Pattern = str | Iterable[str]

ALL_LINEAR = "all-linear"

# What happens to one linear layer.
REPLACE = "replace"  # selected: structured (unless a safety check refuses it)
HEAD = "head"  # the output head under "all-linear": kept dense and reported
EXCLUDED = "excluded"  # named by exclude_modules: kept, not reported
UNSELECTED = "unselected"  # matched by no target or override pattern: kept, not reported


@dataclass(frozen=True)
class TargetDecision:
    """What a surgery does with the linear layer ``name``, and which override pattern (the
    first in mapping order that matches) applies to it."""

    name: str
    action: str
    override: str | None = None


@dataclass(frozen=True)
class TargetSelection:
    """One decision per module name (in the order given), plus the target and override patterns
    that matched no name at all (they deserve a warning: usually a typo)."""

    decisions: tuple[TargetDecision, ...]
    unmatched_targets: tuple[str, ...]
    unmatched_overrides: tuple[str, ...]

    @property
    def actions(self) -> dict[str, str]:
        """``{name: action}``."""
        return {d.name: d.action for d in self.decisions}

    @property
    def overrides(self) -> dict[str, str]:
        """``{name: override pattern}`` for the names an override applies to."""
        return {d.name: d.override for d in self.decisions if d.override is not None}

    @property
    def replaced(self) -> list[str]:
        """The names selected for replacement, in order."""
        return [d.name for d in self.decisions if d.action == REPLACE]


def select_targets(
    names: Sequence[str],
    head: str | None = None,
    target_modules: Pattern = ALL_LINEAR,
    exclude_modules: Pattern | None = None,
    overrides: Iterable[str] = (),
) -> TargetSelection:
    """Decide, for every linear-layer name, whether a surgery replaces it.

    Args:
        names: full names of the model's linear(-like) modules, in module order.
        head: the output head's name; only ``"all-linear"`` consults it (an explicit list or regex
            replaces the head only if it names it).
        target_modules: ``"all-linear"``, a list of names/suffixes, or a regex.
        exclude_modules: same forms (``None``: nothing); an excluded module is never replaced.
        overrides: override patterns (the keys of ``structurize``'s ``overrides``), in order;
            each is a name/suffix or a regex. A module an override names is replaced, head or not.

    Returns:
        A :class:`TargetSelection`. Patterns count as used when they match a name, even one that
        is excluded afterwards.
    """
    all_linear = isinstance(target_modules, str) and target_modules == ALL_LINEAR
    target_keys, target_of = (
        ([], lambda name: ALL_LINEAR) if all_linear else _matcher(target_modules, "target_modules")
    )
    _, excluded_by = _matcher(exclude_modules, "exclude_modules")
    override_keys = list(overrides)
    used_targets: set[str | None] = set()
    used_overrides: set[str | None] = set()
    decisions = []
    for name in names:
        hit, override = target_of(name), _override_for(name, override_keys)
        used_targets.add(hit)
        used_overrides.add(override)
        if excluded_by(name) is not None:
            action = EXCLUDED
        elif override is not None:
            action = REPLACE
        elif all_linear and name == head:
            action = HEAD
        else:
            action = UNSELECTED if hit is None else REPLACE
        decisions.append(TargetDecision(name, action, override))
    return TargetSelection(
        tuple(decisions),
        tuple(k for k in target_keys if k not in used_targets),
        tuple(k for k in override_keys if k not in used_overrides),
    )


def _name_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _matcher(pattern: Pattern | None, what: str) -> tuple[list[str], Callable[[str], str | None]]:
    """Returns (pattern entries, predicate(name) -> matching entry or None); ``what`` names the
    argument in the error for a string that is not a valid regular expression."""
    if pattern is None:
        return [], lambda name: None
    if isinstance(pattern, str):
        try:
            rx = re.compile(pattern)
        except re.error as err:
            raise ValueError(
                f"{what} {pattern!r} is not a valid regular expression ({err}); pass a regex "
                f"matched against full module names, or a list of names"
            ) from None
        return [pattern], lambda name: pattern if rx.fullmatch(name) else None
    keys = list(pattern)

    def match(name: str) -> str | None:
        return next((k for k in keys if _name_matches(name, k)), None)

    return keys, match


def _override_for(name: str, keys: Sequence[str]) -> str | None:
    return next((k for k in keys if _name_matches(name, k) or re.fullmatch(k, name)), None)


#: Module names (the last component) that the output head of a model usually has.
HEAD_NAMES = ("lm_head", "head", "classifier", "fc_out", "output", "readout", "logits")


def output_head(model: nn.Module, names: list[str]) -> tuple[str | None, str]:
    """The output head among the linear layers ``names`` of ``model``, and how it was found
    (surgery keeps it dense under ``"all-linear"``; ``mup.prepare`` zeroes it): the module
    ``get_output_embeddings()`` returns; else the last linear layer whose name ends in one of
    :data:`HEAD_NAMES`; else the last linear layer in module order."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            for n, m in model.named_modules():
                if m is head:
                    return n, "get_output_embeddings"
    named = [n for n in names if n.rpartition(".")[2] in HEAD_NAMES]
    if named:
        return named[-1], f"its name (one of {HEAD_NAMES})"
    return (names[-1], "the last linear layer in module order") if names else (None, "")
