"""Save a structured model and load it back into a freshly built dense one.

``save_structured(model, directory)`` writes

* ``structure.json``: the :class:`~structlin.structure_config.StructureConfig` (which module
  became which structure, every option, how it was initialised, what it replaced), the names of
  tied tensors and the weights file name;
* ``structured.safetensors``: the model's ``state_dict`` (a tensor shared by several names is
  written once, under its first name);
* ``config.json`` (and ``generation_config.json``) for a Hugging Face model, so its dense base can
  be built with ``AutoConfig.from_pretrained(directory)``.

The weights deliberately do not use a file name transformers looks for: a plain
``AutoModel.from_pretrained(directory)`` raises (no ``model.safetensors``) instead of returning a
dense model with random weights. The one call that reloads::

    model = sl.load_structured(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d)), d)

and for your own model, ``sl.load_structured(MyModel(...), d)``. :func:`load_structured` checks
everything (each recorded module exists, is the same kind of linear layer with the same widths
and bias, its spec builds; the weights file has exactly the keys, shapes and dtypes of the
structured model) before it changes the model, then replaces the modules and loads strictly.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .layers import StructuredLinear, make_linear
from .linear_like import is_linear_like, linear_dims
from .structure_config import (
    ORIGIN_ATTR,
    ModuleEntry,
    StructureConfig,
    dtype_name,
    structure_config,
)

__all__ = [
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "StructureMismatchError",
    "load_structured",
    "read_structure",
    "save_structured",
]

#: The manifest: structure config, tied names, weights file.
MANIFEST_NAME = "structure.json"
#: The weights, under a name transformers' ``from_pretrained`` does not load.
WEIGHTS_NAME = "structured.safetensors"
_FORMAT = "structlin.structured"
_FORMAT_VERSION = 1


class StructureMismatchError(ValueError):
    """The model given to :func:`load_structured` does not match the saved structure."""


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError as err:  # an optional dependency (extra "persist")
        raise ImportError(
            "save_structured / load_structured need safetensors: pip install safetensors"
        ) from err
    return st


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One CPU copy per distinct tensor, and ``{alias: kept name}`` for tied names."""
    kept: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        key = (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())
        if t.numel() and key in kept:
            tied[name] = kept[key]
            continue
        kept[key] = name
        storage = t.untyped_storage().data_ptr() if t.numel() else None
        # safetensors refuses tensors that share memory; a view of a kept tensor is copied.
        t = t.detach().to("cpu").contiguous()
        if storage is not None and storage in storages:
            t = t.clone()
        storages.add(storage)
        tensors[name] = t
    return tensors, tied


def save_structured(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model`` (structure config, weights, HF config) to ``directory``; returns its path.

    Atomic: everything is written to a temporary folder beside ``directory`` that is renamed
    into place at the end, so a failure leaves no half-written directory. An existing
    ``directory`` is replaced only if it is empty or was written by ``save_structured``.
    """
    st = _safetensors()
    directory = Path(directory)
    if directory.exists() and not (
        directory.is_dir()
        and ((directory / MANIFEST_NAME).is_file() or not any(directory.iterdir()))
    ):
        raise FileExistsError(
            f"save_structured: {directory} exists and was not written by save_structured; "
            f"choose a new or empty directory"
        )
    config = structure_config(model)
    tensors, tied = _dedupe(model.state_dict())
    manifest = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "model_class": type(model).__name__,
        "weights": WEIGHTS_NAME,
        "tied": tied,
        "structure": config.to_dict(),
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.mkdir()
        st.save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _save_hf_configs(model, tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _save_hf_configs(model: nn.Module, directory: Path) -> None:
    """A Hugging Face model's ``config.json`` / ``generation_config.json``, so its dense base
    can be rebuilt from ``directory`` alone."""
    for attr in ("config", "generation_config"):
        config = getattr(model, attr, None)
        if config is not None and callable(getattr(config, "save_pretrained", None)):
            config.save_pretrained(directory)


def _swap_in(tmp: Path, directory: Path) -> None:
    """Rename the finished ``tmp`` to ``directory``, replacing an old one only at the end."""
    if not directory.exists():
        os.replace(tmp, directory)
        return
    old = directory.with_name(f".{directory.name}.{secrets.token_hex(4)}.old")
    os.replace(directory, old)
    try:
        os.replace(tmp, directory)
    except BaseException:
        os.replace(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {MANIFEST_NAME}: not a directory written by save_structured"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != _FORMAT or manifest.get("format_version", 0) > _FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r} is not one this structlin reads "
            f"({_FORMAT!r} up to version {_FORMAT_VERSION})"
        )
    return manifest


def read_structure(directory: str | os.PathLike) -> StructureConfig:
    """The :class:`StructureConfig` saved in ``directory`` by :func:`save_structured`."""
    return StructureConfig.from_dict(_read_manifest(Path(directory))["structure"])


def load_structured(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Apply the saved surgery to a freshly built dense ``model``, load the weights, return it.

    ``model`` is the dense base (your constructor, or ``AutoModel...from_config(
    AutoConfig.from_pretrained(directory))``), in the dtype it was saved in. Every recorded
    module must be there, be the same kind of linear layer (``Linear`` or ``Conv1D``) with the
    same widths and bias; the weights file must hold exactly the structured model's keys, shapes
    and dtypes. Anything else raises :class:`StructureMismatchError` naming the module or key,
    before the model is changed. Afterwards ``model`` computes what the saved model computed
    (bit for bit on the same device and dtype), in the train/eval mode it was given.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    config = StructureConfig.from_dict(manifest["structure"])
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "load_structured: the model has parameters on the meta device; build it with real "
            "tensors (e.g. from_config without init_empty_weights)"
        )
    where = f"load_structured({str(directory)!r})"
    new_layers = {e.path: _new_layer(model, e, where) for e in config.modules}
    _check_no_extra_structured(model, config, where)
    tensors = _safetensors().load_file(str(directory / manifest["weights"]))
    for alias, kept in manifest.get("tied", {}).items():
        tensors[alias] = tensors[kept]
    _check_state(_expected_state(model, new_layers), tensors, manifest, where)
    for entry in config.modules:
        layer = new_layers[entry.path]
        if layer is not None:
            parent, _, child = entry.path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
    model.load_state_dict(tensors, strict=True)
    return model


def _new_layer(model: nn.Module, entry: ModuleEntry, where: str) -> StructuredLinear | None:
    """The layer that replaces ``entry.path`` (None: it is already that structured layer)."""
    try:
        module = model.get_submodule(entry.path)
    except AttributeError:
        raise StructureMismatchError(
            f"{where}: module {entry.path!r} ({entry.describe_base()} made {entry.spec!r}) is "
            f"not in the {type(model).__name__} given; is it the same base architecture?"
        ) from None
    if isinstance(module, StructuredLinear):
        same = (module.spec, module.in_features, module.out_features) == (
            entry.spec,
            entry.in_features,
            entry.out_features,
        )
        if same and (module.bias is not None) == entry.bias:
            return None
        raise StructureMismatchError(
            f"{where}: module {entry.path!r} is already structured as {module.spec!r} "
            f"({module.in_features} -> {module.out_features}), but was saved as {entry.spec!r} "
            f"({entry.in_features} -> {entry.out_features}); pass the dense base model"
        )
    _check_base(module, entry, where)
    try:
        layer = make_linear(
            entry.spec,
            entry.in_features,
            entry.out_features,
            bias=entry.bias,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
    except (ValueError, TypeError, KeyError) as err:
        raise StructureMismatchError(
            f"{where}: module {entry.path!r}: the saved spec {entry.spec!r} does not build: {err}"
        ) from err
    layer.train(module.training)
    setattr(layer, ORIGIN_ATTR, (entry.base, entry.init))
    return layer


def _check_base(module: nn.Module, entry: ModuleEntry, where: str) -> None:
    """``module`` is the dense layer ``entry`` replaced: kind, widths and bias."""
    name = type(module).__name__
    if not is_linear_like(module):
        raise StructureMismatchError(
            f"{where}: module {entry.path!r} is a {name}, but the saved model replaced "
            f"{entry.describe_base()} there; is it the same base architecture?"
        )
    d_in, d_out = linear_dims(module)
    found = f"{name}({d_in}, {d_out}, bias={module.bias is not None})"
    wanted = f"{entry.base or name}({entry.in_features}, {entry.out_features}, bias={entry.bias})"
    if found != wanted:
        raise StructureMismatchError(
            f"{where}: module {entry.path!r} is {found} in the model given, but the saved model "
            f"replaced {wanted}; is it the same base architecture and config?"
        )


def _check_no_extra_structured(model: nn.Module, config: StructureConfig, where: str) -> None:
    recorded = set(config.paths)
    extra = [
        n
        for n, m in model.named_modules()
        if isinstance(m, StructuredLinear) and n and n not in recorded
    ]
    if extra:
        raise StructureMismatchError(
            f"{where}: modules {extra} of the model given are structured but the saved model "
            f"has no such structured layer; pass the dense base model"
        )


def _expected_state(
    model: nn.Module, new_layers: dict[str, StructuredLinear | None]
) -> dict[str, torch.Tensor]:
    """The ``state_dict`` the model will have once ``new_layers`` are in place."""
    replaced = tuple(f"{p}." for p, layer in new_layers.items() if layer is not None)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(replaced)}
    for path, layer in new_layers.items():
        if layer is not None:
            state.update({f"{path}.{k}": v for k, v in layer.state_dict().items()})
    return state


def _owner(key: str, paths: list[str]) -> str:
    """The recorded module a state key belongs to, for error messages."""
    owners = [p for p in paths if key.startswith(f"{p}.")]
    return f"module {max(owners, key=len)!r}" if owners else f"key {key!r}"


def _check_state(
    expected: dict[str, torch.Tensor],
    saved: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    where: str,
) -> None:
    """The saved tensors are exactly the expected keys, with the same shapes and dtypes."""
    paths = [m["path"] for m in manifest["structure"]["modules"]]
    problems = [f"missing {k!r} ({_owner(k, paths)})" for k in expected if k not in saved]
    problems += [f"unexpected {k!r} ({_owner(k, paths)})" for k in saved if k not in expected]
    for key in expected.keys() & saved.keys():
        want, got = expected[key], saved[key]
        if tuple(want.shape) != tuple(got.shape) or want.dtype != got.dtype:
            problems.append(
                f"{key!r} ({_owner(key, paths)}): saved {tuple(got.shape)} {dtype_name(got.dtype)}"
                f", the model has {tuple(want.shape)} {dtype_name(want.dtype)}"
            )
    if problems:
        shown = "\n  ".join(sorted(problems)[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise StructureMismatchError(
            f"{where}: the saved weights do not fit the model "
            f"({manifest.get('model_class')} was saved):\n  {shown}{more}"
        )
