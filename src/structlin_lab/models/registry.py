"""A small timm-style model registry: ``create_model("vit", num_classes=10, width=64, depth=3)``.

Keyword arguments are checked against the constructor's signature before anything is built, so a
misspelt option fails with the list of accepted ones instead of being swallowed (the paper
authors' code's ``**_`` silently dropped, e.g., the MLP's ``ffn_expansion``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from structlin.options import check_options

from .gpt2 import GPT2, GPTConfig
from .mlp import MLP
from .vit import ViT

__all__ = ["create_model", "list_models", "register_model"]

_F = TypeVar("_F", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[_F], _F]:
    """Decorator registering a model class or factory under ``name``; returns it unchanged.

    The factory is called with the keyword arguments given to :func:`create_model`; the keywords
    it accepts are read from its signature (``inspect.signature``).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_model: name must be a non-empty string, got {name!r}")

    def decorator(fn: _F) -> _F:
        if not callable(fn):
            raise TypeError(f"register_model({name!r}): {fn!r} is not callable")
        if name in _MODELS:
            raise ValueError(f"register_model: a model named {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return decorator


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the shell-style ``pattern``, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def _accepted(sig: inspect.Signature) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in sig.parameters.values() if p.kind in kinds]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` with keyword arguments ``kwargs``.

    Raises:
        ValueError: unknown name (the message lists the registered ones), unknown keyword or a
            missing required one (the message lists the accepted ones).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    fn = _MODELS[name]
    sig = inspect.signature(fn)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    accepted = _accepted(sig)
    if not takes_any:
        check_options(f"create_model({name!r})", kwargs, accepted, what="argument")
    try:
        sig.bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"create_model({name!r}): {err}; accepted: {', '.join(accepted)}") from err
    return fn(**kwargs)


def _gpt2(**kwargs: Any) -> GPT2:
    return GPT2(GPTConfig(**kwargs))


# The factory takes GPTConfig's fields as keywords; expose them as its signature so that
# create_model can check them and help() shows them.
_gpt2.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
        for f in dataclasses.fields(GPTConfig)
    ],
    return_annotation=GPT2,
)
_gpt2.__doc__ = "GPT-2 built from ``GPTConfig(**kwargs)``; see :class:`GPTConfig`."

register_model("mlp")(MLP)
register_model("vit")(ViT)
register_model("gpt2")(_gpt2)
