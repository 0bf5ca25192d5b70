"""Which module of a model became which structure: a JSON-serialisable record.

A :class:`StructureConfig` lists, for every structured layer of a model, its module path, its
full spec string (structure and every option, ``norm`` included: ``parse_spec(entry.spec)`` and
``make_linear(entry.spec, in_features, out_features, bias=entry.bias)`` rebuild it), and what the
module was before (``nn.Linear`` or Hugging Face ``Conv1D``, its widths) and how the layer was
initialised. :func:`structure_config` reads it off the model itself, so two ``structurize`` calls
on one model end up in one config. Nothing is stored on tensors: the spec comes from
``layer.options()``, the origin from a plain attribute the surgery sets on the layer module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .layers import StructuredLinear

__all__ = ["CONFIG_VERSION", "ModuleEntry", "StructureConfig", "structure_config"]

#: Schema version of :class:`StructureConfig`; bumped on any incompatible change.
CONFIG_VERSION = 1

# The surgery records ``(base class name, init)`` on each layer it builds under this attribute.
ORIGIN_ATTR = "_surgery_origin"


@dataclass(frozen=True)
class ModuleEntry:
    """One structured layer of a model.

    Attributes:
        path: the module's full name in the model (``model.get_submodule(path)``).
        spec: the layer's spec string (``layer.spec``), every option included.
        in_features, out_features: the widths ``d_in``, ``d_out`` of ``W`` (``d_out x d_in``).
        bias: whether the layer has a bias.
        dtype: the parameters' dtype, e.g. ``"float32"``.
        base: the module it replaced: ``"Linear"``, ``"Conv1D"`` (Hugging Face GPT-2, weight
            stored ``d_in x d_out``), or None when unknown (a layer built by hand).
        init: ``"mup"`` or ``"from_dense"`` for a layer made by ``structurize``, else None.
    """

    path: str
    spec: str
    in_features: int
    out_features: int
    bias: bool
    dtype: str
    base: str | None = None
    init: str | None = None

    def describe_base(self) -> str:
        return f"{self.base or 'a linear layer'}({self.in_features}, {self.out_features})"


@dataclass(frozen=True)
class StructureConfig:
    """Every structured layer of a model, in module order (see the module docstring).

    ``to_dict()`` / ``from_dict()`` and ``to_json()`` / ``from_json()`` round-trip exactly.
    """

    modules: tuple[ModuleEntry, ...] = ()
    version: int = CONFIG_VERSION

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self.modules]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "modules": [asdict(m) for m in self.modules],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructureConfig:
        """Read a dict written by :meth:`to_dict`; a newer ``version`` is refused."""
        if not isinstance(data, dict) or "modules" not in data:
            raise ValueError(f"not a structlin structure config: {str(data)[:200]}")
        version = data.get("version")
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ValueError(
                f"structure config version {version!r} is not supported by this structlin "
                f"(it reads versions up to {CONFIG_VERSION}); upgrade structlin"
            )
        names = set(ModuleEntry.__dataclass_fields__)
        entries = []
        for raw in data["modules"]:
            unknown = set(raw) - names
            if unknown:
                raise ValueError(f"structure config entry {raw!r}: unknown fields {unknown}")
            entries.append(ModuleEntry(**raw))
        return cls(tuple(entries), version)

    @classmethod
    def from_json(cls, text: str) -> StructureConfig:
        return cls.from_dict(json.loads(text))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def entry_for(path: str, layer: StructuredLinear) -> ModuleEntry:
    """The config entry of ``layer`` found at ``path``."""
    base, init = getattr(layer, ORIGIN_ATTR, (None, None))
    dtype = next((p.dtype for p in layer.parameters()), torch.get_default_dtype())
    return ModuleEntry(
        path,
        layer.spec,
        layer.in_features,
        layer.out_features,
        layer.bias is not None,
        dtype_name(dtype),
        base,
        init,
    )


def structure_config(model: nn.Module) -> StructureConfig:
    """The :class:`StructureConfig` of ``model``: one entry per structured layer, module order.

    Reads the model as it is now, so layers from several ``structurize`` calls (and layers put in
    by hand, recorded with ``base``/``init`` None) are all listed.

    Examples::

        >>> import structlin as sl
        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> _ = sl.structurize(model, "low_rank:rank=2")
        >>> [(m.path, m.spec, m.base) for m in structure_config(model).modules]
        [('0', 'low_rank:rank=2', 'Linear')]
    """
    modules = tuple(
        entry_for(name, m)
        for name, m in model.named_modules()
        if isinstance(m, StructuredLinear) and name
    )
    return StructureConfig(modules)
