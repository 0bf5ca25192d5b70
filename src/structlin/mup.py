"""Structure-aware μP: per-parameter learning-rate multipliers as plain optimizer groups.

μP (Yang & Hu; Yang et al.) keeps every layer's feature updates Θ(1) as width grows by scaling
learning rates with fan-in. For a structured layer each factor is itself a (batched) dense map
with its own fan-in, and the layer's update is the sum of its factors' updates. The
structure-aware rule (Qiu et al., ICML 2024, Section 3) gives factor ``t`` of a layer with input
width ``d_in`` (base model: ``d_in_base``) and ``n_f`` factors, for Adam,

    lr_t = lr * (d_in_base / d_in) * (d_in / fan_in_t) / n_f  =  lr * d_in_base / (n_f * fan_in_t)

so a square rank-1 BTT's factors scale as ``1 / sqrt(d)`` where a dense layer's scale as
``1 / d``. ``lr_rule="dense"`` gives every factor the dense multiplier ``d_in_base / d_in``
instead (the paper's "naive" baseline). For SGD the dense multiplier is
``(d_out / d_in) / (d_out_base / d_in_base)`` and a factor's share is
``((fan_out_t / fan_in_t) / (d_out / d_in)) / n_f``.

Roles (for reporting; the formulas above already cover them):

* ``input``: fan-in fixed, fan-out grows with width (first layer, embeddings);
* ``hidden``: both grow; ``readout``: fan-in grows, fan-out fixed (the head);
* ``fixed``: no dimension differs from the base model;
* ``vector`` (biases, norm gains) and ``scalar`` (weight-norm gains): multiplier 1, no weight decay.

Nothing is stored on tensors: roles and multipliers are derived from module structure and names
each time, and the base model is matched to the model **by name**. The result is a list of
ordinary ``torch.optim`` parameter groups (each with ``lr`` already multiplied, plus ``lr_mult``
and ``names`` for inspection), so any optimizer and any LR scheduler (which scales each group
relative to its initial LR) work unchanged.

μP also fixes the initialisation; :func:`prepare` (in :mod:`structlin.mup_prepare`) applies it to
a model written for standard parametrisation and reports what only the model's code can change.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .layers import StructuredLinear, mup_init_std
from .linear_like import is_linear_like, linear_dims
from .mup_prepare import RESIDUAL_OUTPUTS, PrepareReport, PrepareRow, prepare

__all__ = [
    "RESIDUAL_OUTPUTS",
    "ParamInfo",
    "PrepareReport",
    "PrepareRow",
    "base_shapes",
    "describe",
    "param_groups",
    "param_info",
    "prepare",
]

_LINEAR_KEY = ".__linear__"
_OPTIMIZERS = ("adam", "adamw", "sgd")
_RULES = ("structure-aware", "dense")

BaseSpec = nn.Module | Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class ParamInfo:
    """What μP decides for one parameter."""

    name: str
    role: str
    fan_in: int | None
    fan_out: int | None
    init_std: float | None  # the spectral μP init std of this factor, None for vectors/scalars
    lr_mult: float
    weight_decay: float


def base_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes μP needs from a base model: every parameter's shape, plus
    ``"<module>.__linear__": (d_in, d_out)`` for every linear-like module.

    Works on models built on the ``meta`` device, so a base model costs no memory::

        with torch.device("meta"):
            base = MyModel(width=64)
        shapes = base_shapes(base)  # can be saved as JSON and passed as ``base=``
    """
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for name, module in model.named_modules():
        if name and is_linear_like(module):
            shapes[name + _LINEAR_KEY] = linear_dims(module)
    return shapes


def _base_linear_dims(shapes: Mapping[str, tuple[int, ...]], name: str) -> tuple[int, int] | None:
    if name + _LINEAR_KEY in shapes:
        d_in, d_out = shapes[name + _LINEAR_KEY]
        return int(d_in), int(d_out)
    w = shapes.get(name + ".weight")
    if w is not None and len(w) == 2:  # nn.Linear layout (out, in)
        return int(w[1]), int(w[0])
    return None


def param_info(
    model: nn.Module,
    *,
    base: BaseSpec,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    lr_rule: str = "structure-aware",
    multipliers: Mapping[str, float] | None = None,
) -> list[ParamInfo]:
    """Role, fans, μP init std, LR multiplier and weight decay of every trainable parameter."""
    optimizer = optimizer.lower()
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    if lr_rule not in _RULES:
        raise ValueError(f"lr_rule must be one of {_RULES}, got {lr_rule!r}")
    model = _unwrap(model)
    shapes = base_shapes(_unwrap(base)) if isinstance(base, nn.Module) else dict(base)
    infos, missing = _collect(model, shapes, optimizer == "sgd", lr_rule, weight_decay)
    infos = _dedupe(infos, model)
    if missing:
        raise ValueError(
            f"μP base does not match the model by name: no base entry for {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}. The base must be the same architecture "
            f"(same module names and depth), differing only in width; build it with the same "
            f"code, e.g. on the meta device."
        )
    return _apply_multipliers(infos, multipliers)


def _collect(
    model: nn.Module,
    shapes: Mapping[str, tuple[int, ...]],
    sgd: bool,
    lr_rule: str,
    weight_decay: float,
) -> tuple[list[ParamInfo], list[str]]:
    """Every trainable parameter's info, module by module (a linear-like module's factors as
    one unit, see :func:`_linear_infos`), and the names the base has no entry for."""
    infos: list[ParamInfo] = []
    missing: list[str] = []
    linear_prefixes: list[str] = []
    for mod_name, module in model.named_modules():
        if any(mod_name.startswith(p) for p in linear_prefixes):
            continue  # parameters inside a linear layer (e.g. its ParameterList) are done
        prefix = f"{mod_name}." if mod_name else ""
        if mod_name and is_linear_like(module):
            linear_prefixes.append(prefix)
            dims = _base_linear_dims(shapes, mod_name)
            if dims is None:
                missing.append(mod_name)
            else:
                infos += _linear_infos(module, prefix, dims, sgd, lr_rule, weight_decay)
            continue
        for pname, p in module.named_parameters(recurse=False):
            full = prefix + pname
            if not p.requires_grad:
                continue
            if p.dim() <= 1:
                infos.append(_vector_info(full, p))
            elif full not in shapes:
                missing.append(full)
            else:
                infos.append(
                    _tensor_info(full, tuple(p.shape), tuple(shapes[full]), sgd, weight_decay)
                )
    return infos, missing


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile's OptimizedModule and DDP/FSDP-style wrappers prefix parameter names.
    for attr in ("_orig_mod", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and type(model).__name__ in (
            "OptimizedModule",
            "DistributedDataParallel",
            "DataParallel",
        ):
            return _unwrap(inner)
    return model


def _dedupe(infos: list[ParamInfo], model: nn.Module) -> list[ParamInfo]:
    """Keep one entry per tensor (tied weights appear under several names) and only names that
    ``model.named_parameters()`` reports."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    by_name = dict(model.named_parameters(remove_duplicate=False))
    seen: set[int] = set()
    out = []
    for info in infos:
        p = by_name.get(info.name)
        if p is None or id(p) in seen or canonical.get(id(p)) is None:
            continue
        seen.add(id(p))
        out.append(
            info
            if canonical[id(p)] == info.name
            else ParamInfo(**{**info.__dict__, "name": canonical[id(p)]})
        )
    return out


def _vector_info(name: str, p: torch.Tensor) -> ParamInfo:
    role = "scalar" if p.dim() == 0 else "vector"
    return ParamInfo(name, role, None, None, None, 1.0, 0.0)


def _role(d_in: int, d_out: int, base_in: int, base_out: int) -> str:
    grow_in, grow_out = d_in != base_in, d_out != base_out
    return {
        (False, False): "fixed",
        (False, True): "input",
        (True, True): "hidden",
        (True, False): "readout",
    }[(grow_in, grow_out)]


def _linear_infos(
    module: nn.Module,
    prefix: str,
    base_dims: tuple[int, int],
    sgd: bool,
    lr_rule: str,
    wd: float,
) -> list[ParamInfo]:
    d_in, d_out = linear_dims(module)
    base_in, base_out = base_dims
    role = _role(d_in, d_out, base_in, base_out)
    if sgd:
        dense_mult = (d_out / d_in) / (base_out / base_in)
    else:
        dense_mult = base_in / d_in
    if isinstance(module, StructuredLinear):
        factors = [(f.name, f.fan_in, f.fan_out) for f in module.factors()]
    else:  # nn.Linear / Conv1D: one dense factor
        factors = [("weight", d_in, d_out)]
    n_f = len(factors)
    infos = []
    factor_names = set()
    for name, fan_in, fan_out in factors:
        factor_names.add(name)
        if lr_rule == "dense" or (n_f == 1 and fan_in == d_in and fan_out == d_out):
            mult = dense_mult
        elif sgd:
            mult = dense_mult * ((fan_out / fan_in) / (d_out / d_in)) / n_f
        else:
            mult = dense_mult * (d_in / fan_in) / n_f
        infos.append(
            ParamInfo(prefix + name, role, fan_in, fan_out, mup_init_std(fan_in, fan_out), mult, wd)
        )
    for name, p in module.named_parameters(recurse=True):
        if name not in factor_names and p.requires_grad:
            infos.append(_other_info(prefix + name, p, d_in, base_in, wd))
    return infos


def _other_info(name: str, p: torch.Tensor, d_in: int, base_in: int, wd: float) -> ParamInfo:
    """A layer's parameter that is not one of its factors: a dense map of the layer's input,
    ``(fan_out, d_in)`` with a fan-out the layer fixes (a mixture's router), gets the dense rule,
    which for Adam and SGD alike is ``base_in / d_in``; biases and gains are vectors."""
    if p.dim() == 2 and p.shape[1] == d_in:
        fan_out = int(p.shape[0])
        role = _role(d_in, fan_out, base_in, fan_out)
        std = mup_init_std(d_in, fan_out)
        return ParamInfo(name, role, d_in, fan_out, std, base_in / d_in, wd)
    return _vector_info(name, p)


def _tensor_info(
    name: str, shape: tuple[int, ...], base: tuple[int, ...], sgd: bool, wd: float
) -> ParamInfo:
    if len(shape) != len(base):
        raise ValueError(f"μP base shape {base} of {name!r} has a different rank than {shape}")
    changed = [i for i, (a, b) in enumerate(zip(shape, base, strict=True)) if a != b]
    # torch convention for weights outside linear layers (conv, embeddings): (out, in, ...).
    fan_out, fan_in = shape[0], math.prod(shape[1:])
    if not changed:
        role, mult = "fixed", 1.0
    elif len(changed) == 1:
        # One width axis (embedding tables, positional embeddings, a patch conv): input-like.
        role = "input"
        mult = shape[changed[0]] / base[changed[0]] if sgd else 1.0
    else:
        role = "hidden"
        base_in = math.prod(base[1:])
        mult = (fan_out / fan_in) / (base[0] / base_in) if sgd else base_in / fan_in
    return ParamInfo(name, role, fan_in, fan_out, mup_init_std(fan_in, fan_out), mult, wd)


def _apply_multipliers(
    infos: list[ParamInfo], multipliers: Mapping[str, float] | None
) -> list[ParamInfo]:
    if not multipliers:
        return infos
    used = set()
    out = []
    for info in infos:
        mult = info.lr_mult
        for pattern, factor in multipliers.items():
            if re.search(pattern, info.name):
                mult *= float(factor)
                used.add(pattern)
        out.append(ParamInfo(**{**info.__dict__, "lr_mult": mult}))
    for pattern in multipliers:
        if pattern not in used:
            warnings.warn(
                f"μP multiplier pattern {pattern!r} matched no parameter name", stacklevel=3
            )
    return out


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    base: BaseSpec,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    lr_rule: str = "structure-aware",
    multipliers: Mapping[str, float] | None = None,
) -> list[dict]:
    """μP parameter groups for ``torch.optim``: ``torch.optim.Adam(param_groups(m, 3e-3, base=b))``.

    Args:
        model: the model to train (structured or not).
        lr: the base learning rate, tuned at the base width.
        base: a model of the same architecture at the base width (ideally on the ``meta``
            device) or the output of :func:`base_shapes`. Matched by name.
        optimizer: ``"adam"``/``"adamw"`` (LR ∝ 1/fan-in) or ``"sgd"`` (LR ∝ fan-out/fan-in).
        weight_decay: applied to matrices and factors only; vectors and scalars get 0.
        lr_rule: ``"structure-aware"`` (per-factor fan-in) or ``"dense"`` (the naive baseline:
            every factor gets its layer's dense multiplier).
        multipliers: ``{regex: factor}`` extra multipliers on matching parameter names, e.g.
            ``{"input_layer": 0.1}``.

    Returns:
        Groups ``{"params", "lr", "lr_mult", "weight_decay", "names"}``, one per distinct
        ``(lr_mult, weight_decay)``.
    """
    _check_lr(lr)
    infos = param_info(
        model,
        base=base,
        optimizer=optimizer,
        weight_decay=weight_decay,
        lr_rule=lr_rule,
        multipliers=multipliers,
    )
    params = dict(_unwrap(model).named_parameters())
    groups: dict[tuple[float, float], dict] = {}
    for info in infos:
        key = (info.lr_mult, info.weight_decay)
        group = groups.setdefault(
            key,
            {
                "params": [],
                "names": [],
                "lr": lr * info.lr_mult,
                "lr_mult": info.lr_mult,
                "weight_decay": info.weight_decay,
            },
        )
        group["params"].append(params[info.name])
        group["names"].append(info.name)
    return list(groups.values())


@torch.no_grad()
def _held_std(p: torch.Tensor) -> str:
    """The std a tensor holds, formatted like ``init_std`` ("" on the meta device)."""
    if p.is_meta or p.numel() < 2:
        return ""
    return f"{p.detach().double().std().item():.4g}"


def _check_lr(lr: float) -> None:
    """A negative or non-finite LR is an error (the optimizer would train uphill or diverge);
    ``lr=0`` only warns: it is a legitimate way to build an optimizer that changes nothing (a
    coordinate check at step 0, an evaluation-only run), but a training run with it learns
    nothing, which a user should hear about."""
    try:
        value = float(lr)
    except (TypeError, ValueError):
        raise ValueError(f"param_groups: lr must be a number, got {lr!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"param_groups: lr must be a finite positive number (the learning rate at the base "
            f"width), got lr={lr!r}; e.g. lr=1e-3"
        )
    if value == 0:
        warnings.warn(
            "param_groups: lr=0, so the optimizer will not change any parameter; pass a positive "
            "learning rate (e.g. lr=1e-3) to train",
            stacklevel=3,
        )


def describe(
    model: nn.Module,
    *,
    base: BaseSpec,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    lr_rule: str = "structure-aware",
    multipliers: Mapping[str, float] | None = None,
    file=None,
) -> str:
    """Print (and return) one line per parameter: role, fan-in, fan-out, the spectral μP init
    std ``sqrt(min(fan_in, fan_out)) / fan_in`` (``init_std``), the std the tensor holds now
    (``std``), LR multiplier, weight decay.

    ``std`` is measured, so it shows a layer that kept another init: an ``nn.Linear`` left with
    PyTorch's default holds ``1 / sqrt(3 fan_in)``, not ``init_std``. It is empty for vectors,
    scalars and tensors on the meta device."""
    infos = param_info(
        model,
        base=base,
        optimizer=optimizer,
        weight_decay=weight_decay,
        lr_rule=lr_rule,
        multipliers=multipliers,
    )
    params = dict(_unwrap(model).named_parameters())
    width = max([len(i.name) for i in infos] + [9])
    lines = [
        f"{'parameter':<{width}}  {'role':<8}{'fan_in':>8}{'fan_out':>9}{'init_std':>10}"
        f"{'std':>10}{'lr_mult':>10}{'wd':>8}"
    ]
    for i in infos:
        fi = "" if i.fan_in is None else str(i.fan_in)
        fo = "" if i.fan_out is None else str(i.fan_out)
        std = "" if i.init_std is None else f"{i.init_std:.4g}"
        held = _held_std(params[i.name]) if i.init_std is not None else ""
        lines.append(
            f"{i.name:<{width}}  {i.role:<8}{fi:>8}{fo:>9}{std:>10}{held:>10}{i.lr_mult:>10.4g}"
            f"{i.weight_decay:>8.3g}"
        )
    text = "\n".join(lines)
    print(text, file=file)
    return text
