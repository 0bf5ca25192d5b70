"""String-to-class registry of structures, in the style of timm's model registry.

``make_linear("btt:rank=4,cores=3", 768, 3072)`` builds a layer from a spec string; the same
options may be given as keyword arguments, which take precedence over the string.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from ..options import check_options
from .base import StructuredLinear
from .spec import parse_spec

__all__ = [
    "get_structure",
    "list_structures",
    "make_linear",
    "parse_spec",
    "register_structure",
    "structure_options",
]

_REGISTRY: dict[str, type[StructuredLinear]] = {}
_COMMON = {"in_features", "out_features", "bias", "device", "dtype", "self"}

T = TypeVar("T", bound=type[StructuredLinear])


def register_structure(name: str) -> Callable[[T], T]:
    """Class decorator: register a :class:`StructuredLinear` subclass under ``name``."""

    def deco(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, StructuredLinear)):
            raise TypeError(
                f"register_structure({name!r}) expects a StructuredLinear subclass, got {cls!r}"
            )
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"structure {name!r} is already registered to {_REGISTRY[name].__name__}"
            )
        cls.structure = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_structures(pattern: str = "*") -> list[str]:
    """Registered structure names matching the fnmatch ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_structure(name: str) -> type[StructuredLinear]:
    """The class registered as ``name``; a ValueError lists the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown structure {name!r}; valid structures are: {', '.join(list_structures())}"
        ) from None


def _keyword_options(fn: Callable) -> list[str]:
    params = inspect.signature(fn).parameters
    return [
        n
        for n, p in params.items()
        if n not in _COMMON and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def structure_options(cls: type[StructuredLinear]) -> list[str]:
    """Names of the keyword options of ``cls``: its own, then those every structure has
    (``norm``, ``learn_gamma``)."""
    own = _keyword_options(cls.__init__)
    return own + [n for n in _keyword_options(StructuredLinear.__init__) if n not in own]


def make_linear(
    spec: str | type[StructuredLinear],
    in_features: int,
    out_features: int,
    bias: bool = True,
    **kwargs: Any,
) -> StructuredLinear:
    """Build a structured layer from a name, a spec string or a class.

    Keyword arguments override the options of the spec; ``device`` and ``dtype`` are passed on.
    ``make_linear(layer.spec, d_in, d_out)`` rebuilds a layer with the factor shapes of ``layer``.

    Examples::

        >>> make_linear("btt:rank=4", 768, 3072).spec
        'btt:cores=2,rank=4,in_factors=24x32,out_factors=48x64'
        >>> make_linear("low_rank", 768, 768, rank=32, bias=False).bias is None
        True
        >>> make_linear(get_structure("btt"), 768, 3072, cores=3).in_factors
        (8, 8, 12)
    """
    if isinstance(spec, type):
        if not issubclass(spec, StructuredLinear):
            raise ValueError(f"make_linear expects a StructuredLinear subclass, got {spec!r}")
        cls, options = spec, {}
    else:
        name, options = parse_spec(spec)
        cls = get_structure(name)
    options.update(kwargs)
    valid = structure_options(cls)
    factory = {k: options.pop(k) for k in ("device", "dtype") if k in options}
    check_options(f"structure {cls.structure or cls.__name__!r}", options, valid)
    return cls(in_features, out_features, bias, **factory, **options)
