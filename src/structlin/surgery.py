"""Model surgery: replace the dense linear layers of any model with structured ones.

``structurize(model, "btt")`` swaps every ``nn.Linear`` (and Hugging Face GPT-2's ``Conv1D``,
whose weight is stored transposed) except the output head for a structured layer, in place, and
returns a report. Module selection follows peft's conventions:

* ``target_modules="all-linear"``: every linear layer but the output head
  (``get_output_embeddings()`` when the model has it, else the last linear layer in module order);
* a list of names: a module matches when its full name equals an entry or ends with ``"." + entry``;
* any other string: a regular expression that must match the full module name
  (``re.fullmatch``).

``overrides`` maps such patterns (a name/suffix or a regex) to another structure spec or to extra
options, e.g. ``{"lm_head": "low_rank:rank=64"}`` or ``{"attn.c_attn_q": {"learn_gamma": False}}``;
a module named by an override is replaced even if it is the output head.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import StructuredLinear, get_structure, make_linear, parse_spec, structure_options
from .linear_like import is_conv1d, is_linear_like, linear_dims
from .options import check_options

__all__ = ["SurgeryReport", "SurgeryRow", "structurize"]

Pattern = str | Iterable[str]


@dataclass
class SurgeryRow:
    """One linear layer seen by :func:`structurize`."""

    name: str
    old: str
    new: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    status: str  # "replaced", "dry-run", "kept (head)", "already structured", "refused: ..."

    @property
    def changed(self) -> bool:
        return self.status in ("replaced", "dry-run")


class SurgeryReport(list):
    """The rows of a surgery, printable as a table (``print(report)``)."""

    @property
    def replaced(self) -> list[str]:
        return [r.name for r in self if r.changed]

    @property
    def refused(self) -> list[SurgeryRow]:
        return [r for r in self if r.status.startswith("refused")]

    def totals(self) -> dict[str, int]:
        rows = [r for r in self if r.changed]
        return {
            "layers": len(rows),
            "params_before": sum(r.params_before for r in rows),
            "params_after": sum(r.params_after for r in rows),
            "macs_before": sum(r.macs_before for r in rows),
            "macs_after": sum(r.macs_after for r in rows),
        }

    def __str__(self) -> str:
        header = ("module", "old", "new", "params", "params'", "MACs", "MACs'", "status")
        body = [
            (
                r.name,
                r.old,
                r.new,
                f"{r.params_before:,}",
                f"{r.params_after:,}",
                f"{r.macs_before:,}",
                f"{r.macs_after:,}",
                r.status,
            )
            for r in self
        ]
        t = self.totals()
        p_ratio = t["params_after"] / t["params_before"] if t["params_before"] else float("nan")
        f_ratio = t["macs_after"] / t["macs_before"] if t["macs_before"] else float("nan")
        widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        lines.append(
            f"{t['layers']} layer(s) structured: params {t['params_before']:,} -> "
            f"{t['params_after']:,} ({p_ratio:.3g}x), forward MACs per example "
            f"{t['macs_before']:,} -> {t['macs_after']:,} ({f_ratio:.3g}x)"
        )
        return "\n".join(lines)

    __repr__ = __str__


def _name_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _matcher(pattern: Pattern | None) -> tuple[list[str], Any]:
    """Returns (pattern entries, predicate(name) -> matching entry or None)."""
    if pattern is None:
        return [], lambda name: None
    if isinstance(pattern, str):
        rx = re.compile(pattern)
        return [pattern], lambda name: pattern if rx.fullmatch(name) else None
    keys = list(pattern)

    def match(name: str) -> str | None:
        return next((k for k in keys if _name_matches(name, k)), None)

    return keys, match


def _override_for(name: str, overrides: Mapping[str, Any]) -> tuple[str, Any] | None:
    for key, value in overrides.items():
        if _name_matches(name, key) or re.fullmatch(key, name):
            return key, value
    return None


def _output_head(model: nn.Module, names: list[str]) -> str | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            for n, m in model.named_modules():
                if m is head:
                    return n
    return names[-1] if names else None


def _refusal(name: str, module: nn.Module, parent: nn.Module, shared: set[int]) -> str | None:
    if isinstance(parent, nn.MultiheadAttention):
        return "refused: nn.MultiheadAttention reads its out_proj weight directly"
    if not (type(module) is nn.Linear or is_conv1d(module)):
        return (
            f"refused: {type(module).__name__} is a subclass of nn.Linear that may rely on its "
            f"weight; exclude it or replace it by hand"
        )
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "refused: lazy layer not initialised yet; run a forward pass first"
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "refused: the weight is parametrized (torch.nn.utils.parametrize)"
    if id(module.weight) in shared:
        return "refused: the weight is shared with another module (tied weights)"
    return None


def _describe_old(module: nn.Module) -> str:
    d_in, d_out = linear_dims(module)
    return f"{type(module).__name__}({d_in}, {d_out})"


def _resolve_spec(structure: Any, options: dict[str, Any], override: Any) -> tuple[Any, dict]:
    opts = dict(options)
    if override is None:
        return structure, opts
    if isinstance(override, str):
        name, spec_opts = parse_spec(override)
        return get_structure(name), spec_opts  # an override spec replaces the defaults
    if isinstance(override, type):
        return override, {}
    if isinstance(override, Mapping):
        override = dict(override)
        new_structure = override.pop("structure", structure)
        opts.update(override)
        return new_structure, opts
    raise ValueError(f"override values must be a spec string, a class or a dict, got {override!r}")


def structurize(
    model: nn.Module,
    structure: str | type[StructuredLinear],
    *,
    target_modules: Pattern = "all-linear",
    exclude_modules: Pattern | None = None,
    overrides: Mapping[str, Any] | None = None,
    init: str = "mup",
    dry_run: bool = False,
    **options: Any,
) -> SurgeryReport:
    """Replace linear layers of ``model`` in place by structured layers; returns a report.

    Args:
        model: any ``nn.Module``.
        structure: a structure name, spec string (``"btt:rank=4"``) or class.
        target_modules: ``"all-linear"`` (all but the output head), a list of names/suffixes, or a
            regex matched against full module names.
        exclude_modules: same forms; matching modules are kept.
        overrides: ``{pattern: spec | class | dict of options}`` for particular modules.
        init: ``"mup"`` draws fresh μP factors (a layer whose weight is all zeros, e.g. a
            zero-initialised readout or residual output, gets ``zero_init_last``); ``"from_dense"``
            projects the existing weight with ``from_dense``. The bias is copied either way.
        dry_run: change nothing; return the same report.
        **options: structure options for every replaced layer (``rank=4``...).

    Modules it cannot replace safely (tied weights, ``nn.MultiheadAttention.out_proj``, subclasses
    of ``nn.Linear``, parametrized or lazy layers) are kept and reported as refused, with a
    warning. Already structured layers are left alone, so calling it twice does not double-wrap.
    """
    if init not in ("mup", "from_dense"):
        raise ValueError(f"init must be 'mup' or 'from_dense', got {init!r}")
    overrides = dict(overrides or {})
    if isinstance(structure, str):
        name, spec_opts = parse_spec(structure)
        structure = get_structure(name)
        options = {**spec_opts, **options}

    _check_options(structure, options)
    for key, value in overrides.items():
        spec, opts = _resolve_spec(structure, options, value)
        _check_options(get_structure(spec) if isinstance(spec, str) else spec, opts, key)

    modules = dict(model.named_modules())
    linear_names = [n for n, m in modules.items() if is_linear_like(m) and n]
    dense_names = [n for n in linear_names if not isinstance(modules[n], StructuredLinear)]
    if not linear_names:
        raise ValueError(
            f"structurize: {type(model).__name__} has no nn.Linear (or Conv1D) layer to replace"
        )

    all_linear = isinstance(target_modules, str) and target_modules == "all-linear"
    head = _output_head(model, linear_names) if all_linear else None
    if all_linear:
        keys, match = [], lambda name: "all-linear"
    else:
        keys, match = _matcher(target_modules)
    _, exclude = _matcher(exclude_modules)

    counts = {}
    for _, m in model.named_parameters(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    shared = {k for k, c in counts.items() if c > 1}

    report = SurgeryReport()
    used_keys: set[str] = set()
    used_overrides: set[str] = set()
    for name in linear_names:
        module = modules[name]
        d_in, d_out = linear_dims(module)
        ov = _override_for(name, overrides)
        hit = match(name)
        if hit is not None:
            used_keys.add(hit)
        if ov is not None:
            used_overrides.add(ov[0])
        if isinstance(module, StructuredLinear):
            status = "already structured"
            report.append(
                SurgeryRow(
                    name,
                    module.structure,
                    module.structure,
                    module.num_params,
                    module.num_params,
                    module.macs(),
                    module.macs(),
                    status,
                )
            )
            continue
        excluded = exclude(name) is not None
        if excluded or (ov is None and (hit is None or (all_linear and name == head))):
            if all_linear and name == head and not excluded:
                report.append(
                    SurgeryRow(
                        name,
                        _describe_old(module),
                        "-",
                        _param_count(module),
                        _param_count(module),
                        d_in * d_out,
                        d_in * d_out,
                        "kept (head)",
                    )
                )
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        refusal = _refusal(name, module, parent, shared)
        spec, opts = _resolve_spec(structure, options, ov[1] if ov else None)
        weight = module.weight
        new_desc = "-"
        new_params = new_macs = 0
        if refusal is None:
            try:
                probe = make_linear(
                    spec,
                    d_in,
                    d_out,
                    bias=module.bias is not None,
                    device="meta",
                    dtype=weight.dtype,
                    **opts,
                )
                new_desc = _describe_new(probe)
                new_params, new_macs = probe.num_params, probe.macs()
            except ValueError as err:
                refusal = f"refused: {err}"
        if refusal is not None:
            report.append(
                SurgeryRow(
                    name,
                    _describe_old(module),
                    new_desc,
                    _param_count(module),
                    _param_count(module),
                    d_in * d_out,
                    d_in * d_out,
                    refusal,
                )
            )
            continue
        if not dry_run:
            new = _build(module, spec, opts, init, d_in, d_out)
            setattr(parent, child, new)
        report.append(
            SurgeryRow(
                name,
                _describe_old(module),
                new_desc,
                _param_count(module),
                new_params,
                d_in * d_out,
                new_macs,
                "dry-run" if dry_run else "replaced",
            )
        )

    for key in keys:
        if key not in used_keys:
            warnings.warn(
                f"structurize: target pattern {key!r} matched no linear layer; candidates are "
                f"{dense_names[:20]}{' ...' if len(dense_names) > 20 else ''}",
                stacklevel=2,
            )
    for key in overrides:
        if key not in used_overrides:
            warnings.warn(
                f"structurize: override pattern {key!r} matched no linear layer; candidates are "
                f"{dense_names[:20]}{' ...' if len(dense_names) > 20 else ''}",
                stacklevel=2,
            )
    if report.refused:
        warnings.warn(
            "structurize kept some layers dense:\n"
            + "\n".join(f"  {r.name}: {r.status}" for r in report.refused),
            stacklevel=2,
        )
    if not report.replaced and not any(r.status == "already structured" for r in report):
        raise ValueError(
            "structurize: no layer was selected, the model is unchanged; check target_modules / "
            f"exclude_modules. Linear layers in this model: {dense_names[:20]}"
        )
    return report


def _check_options(
    cls: type[StructuredLinear], options: Mapping[str, Any], where: str = ""
) -> None:
    at = f" (override {where!r})" if where else ""
    names = set(options) - {"device", "dtype"}
    check_options(f"structurize: structure {cls.structure!r}{at}", names, structure_options(cls))


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _describe_new(layer: StructuredLinear) -> str:
    text = layer.structure
    opts = layer._options_repr()
    if layer.norm is not None:
        opts = f"{opts}, norm={layer.norm}" if opts else f"norm={layer.norm}"
    return f"{text}({opts})" if opts else text


@torch.no_grad()
def _build(
    module: nn.Module, spec: Any, opts: dict, init: str, d_in: int, d_out: int
) -> StructuredLinear:
    weight = module.weight
    bias = module.bias
    new = make_linear(
        spec, d_in, d_out, bias=bias is not None, device=weight.device, dtype=weight.dtype, **opts
    )
    dense_w = weight.T if is_conv1d(module) else weight
    if init == "from_dense":
        if weight.is_meta:
            raise ValueError(
                "init='from_dense' needs real weights, the model is on the meta device"
            )
        new.from_dense(dense_w, bias)
    else:
        if not weight.is_meta and not bool(dense_w.any()):
            new.reset_parameters(zero_init_last=True)
        if bias is not None and not bias.is_meta:
            new.bias.copy_(bias)
    new.train(module.training)
    for p in new.parameters():
        p.requires_grad_(weight.requires_grad)
    return new
