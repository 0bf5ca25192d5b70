"""Model surgery: replace the dense linear layers of any model with structured ones.

``structurize(model, "btt")`` swaps every ``nn.Linear`` (and Hugging Face GPT-2's ``Conv1D``,
whose weight is stored transposed) except the output head for a structured layer, in place, and
returns a report. Module selection (:mod:`structlin.targets`, a pure function of the module
names) follows peft's conventions:

* ``target_modules="all-linear"``: every linear layer but the output head
  (``get_output_embeddings()`` when the model has it, else the last linear layer named like a
  head, :data:`structlin.targets.HEAD_NAMES`, else the last linear layer in module order; a
  warning names the layer kept when the model has no ``get_output_embeddings``);
* a list of names: a module matches when its full name equals an entry or ends with ``"." + entry``;
* any other string: a regular expression that must match the full module name
  (``re.fullmatch``).

``overrides`` maps such patterns (a name/suffix or a regex) to another structure spec or to extra
options, e.g. ``{"lm_head": "low_rank:rank=64"}`` or ``{"attn.c_attn_q": {"learn_gamma": False}}``;
a module named by an override is replaced even if it is the output head.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from .layers import (
    StructuredLinear,
    get_structure,
    list_structures,
    make_linear,
    parse_spec,
    structure_options,
)
from .linear_like import is_conv1d, is_linear_like, linear_dims
from .options import check_options
from .structure_config import ORIGIN_ATTR, StructureConfig, entry_for, structure_config
from .targets import (
    ALL_LINEAR,
    HEAD,
    REPLACE,
    Pattern,
    TargetSelection,
    output_head,
    select_targets,
)

__all__ = ["COMMON_OPTIONS", "SurgeryReport", "SurgeryRow", "structurize"]

#: Options every structure takes; an override keeps those given to ``structurize`` for all layers.
COMMON_OPTIONS = ("norm", "learn_gamma")


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
    #: With ``init="from_dense"``: the relative Frobenius error ``||W - W'||_F / ||W||_F`` of the
    #: projection (0 for a zero ``W``); None otherwise.
    error: float | None = None
    #: ``omega=… psi=… nu=…`` of an Einsum-family layer (Potapczynski et al., NeurIPS 2024);
    #: "" for every other structure.
    taxonomy: str = ""
    #: Zero-padding of the new layer, e.g. ``"in 64->70, out 64->70"``; "" when it pads nothing.
    padding: str = ""

    @property
    def changed(self) -> bool:
        return self.status in ("replaced", "dry-run")


class SurgeryReport(list):
    """The rows of a surgery, printable as a table (``print(report)``).

    ``report.config`` is the model's :class:`~structlin.structure_config.StructureConfig` after the
    surgery (every structured layer, from this call and earlier ones; for a dry run, the layers it
    would create), the record ``save_structured`` writes. ``report.to_dict()`` is plain JSON data.
    """

    config: StructureConfig = StructureConfig()

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

    def to_dict(self) -> dict[str, Any]:
        """The rows, the totals and the structure config as JSON-serialisable data."""
        return {
            "rows": [asdict(r) for r in self],
            "totals": self.totals(),
            "config": self.config.to_dict(),
        }

    def __str__(self) -> str:
        show = any(r.taxonomy for r in self)  # the column only where an einsum layer is
        pad = any(r.padding for r in self)  # the column only where a layer zero-pads
        header = ("module", "old", "new", "params", "params'", "MACs", "MACs'", "rel. error")
        header += ("taxonomy",) * show + ("padding",) * pad + ("status",)
        body = [
            (
                r.name,
                r.old,
                r.new,
                f"{r.params_before:,}",
                f"{r.params_after:,}",
                f"{r.macs_before:,}",
                f"{r.macs_after:,}",
                "" if r.error is None else f"{r.error:.2e}",
                *((r.taxonomy,) * show),
                *((r.padding,) * pad),
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


def _warn_head(model: nn.Module, head: str | None, how: str) -> None:
    if head is None or how == "get_output_embeddings":
        return
    warnings.warn(
        f"structurize: target_modules='all-linear' keeps {head!r} dense as the output head, "
        f"chosen by {how}, because {type(model).__name__} has no get_output_embeddings(). To "
        f"structure it too, add overrides={{{head!r}: <spec>}}; to keep another layer dense "
        f"instead, pass target_modules=[...] naming the layers to structure, or "
        f"exclude_modules=[...]",
        stacklevel=3,
    )


def _refusal(module: nn.Module, parent: nn.Module, shared: dict[int, list[str]]) -> str | None:
    if isinstance(parent, nn.MultiheadAttention):
        return "refused: nn.MultiheadAttention reads its out_proj weight directly"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "refused: lazy layer not initialised yet; run a forward pass first"
    if not (type(module) is nn.Linear or is_conv1d(module)):
        return (
            f"refused: {type(module).__name__} is a subclass of nn.Linear that may rely on its "
            f"weight; exclude it or replace it by hand"
        )
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "refused: the weight is parametrized (torch.nn.utils.parametrize)"
    if id(module.weight) in shared:
        return (
            f"refused: the weight is shared (tied) by {shared[id(module.weight)]}; untie it "
            f"first: build the model with tie_word_embeddings=False in its config, or give this "
            f"layer its own copy (layer.weight = nn.Parameter(layer.weight.detach().clone()))"
        )
    return None


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """``{id: names}`` of the parameters registered under more than one name (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {k: v for k, v in names.items() if len(v) > 1}


def _describe_old(module: nn.Module) -> str:
    d_in, d_out = linear_dims(module)
    return f"{type(module).__name__}({d_in}, {d_out})"


def _resolve_spec(structure: Any, options: dict[str, Any], override: Any) -> tuple[Any, dict]:
    """The structure and options of a layer an override names. A spec string or class replaces
    the structure and its options, but keeps the common options (``norm``, ``learn_gamma``) given
    for every layer unless it sets them itself; a dict adds to the options."""
    opts = dict(options)
    if override is None:
        return structure, opts
    common = {k: v for k, v in options.items() if k in COMMON_OPTIONS}
    if isinstance(override, str):
        name, spec_opts = parse_spec(override)
        return get_structure(name), {**common, **spec_opts}
    if isinstance(override, type):
        return override, common
    if isinstance(override, Mapping):
        override = dict(override)
        new_structure = override.pop("structure", structure)
        opts.update(override)
        return new_structure, opts
    raise ValueError(f"override values must be a spec string, a class or a dict, got {override!r}")


def _resolve_structure(
    structure: str | type[StructuredLinear], options: dict[str, Any], overrides: Mapping[str, Any]
) -> tuple[type[StructuredLinear], dict[str, Any]]:
    """The structure class and options for every layer (a spec string's options first, then
    ``**options``), after checking them and every override's against the structure's options."""
    if isinstance(structure, str):
        name, spec_opts = parse_spec(structure)
        structure = get_structure(name)
        options = {**spec_opts, **options}
    elif not (isinstance(structure, type) and issubclass(structure, StructuredLinear)):
        raise ValueError(
            f"structurize: structure must be a structure name, a spec string such as "
            f"'btt:rank=4' or a StructuredLinear subclass, got {structure!r}; the names are "
            f"{list_structures()}"
        )
    _check_options(structure, options)
    for key, value in overrides.items():
        spec, opts = _resolve_spec(structure, options, value)
        _check_options(get_structure(spec) if isinstance(spec, str) else spec, opts, key)
    return structure, options


def structurize(
    model: nn.Module,
    structure: str | type[StructuredLinear],
    *,
    target_modules: Pattern = ALL_LINEAR,
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

    Three steps: :func:`structlin.targets.select_targets` decides from the module names alone,
    planning builds the report rows (each new layer probed on the meta device, so nothing is
    allocated), and replacement swaps the modules (skipped by ``dry_run``).
    """
    if init not in ("mup", "from_dense"):
        raise ValueError(f"init must be 'mup' or 'from_dense', got {init!r}")
    overrides = dict(overrides or {})
    structure, options = _resolve_structure(structure, options, overrides)
    modules = dict(model.named_modules())
    names = _linear_names(model, modules)
    dense_names = [n for n in names if not isinstance(modules[n], StructuredLinear)]
    all_linear = isinstance(target_modules, str) and target_modules == ALL_LINEAR
    head, how = output_head(model, names) if all_linear else (None, "")
    selection = select_targets(names, head, target_modules, exclude_modules, overrides)
    if head is not None and selection.actions[head] == HEAD:
        _warn_head(model, head, how)
    plan = _plan(model, selection, structure, options, overrides, dry_run)
    if not dry_run:
        _replace(model, plan, init)
    report = SurgeryReport(step.row for step in plan)
    _warn_and_check(selection, report, dense_names)
    _warn_restructure(plan, selection)
    report.config = _config_after(model, plan, init, dry_run)
    return report


def _linear_names(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """The names of the model's linear(-like) submodules; an error if there is none."""
    names = [n for n, m in modules.items() if is_linear_like(m) and n]
    if names:
        return names
    if is_linear_like(model):
        d_in, d_out = linear_dims(model)
        raise ValueError(
            f"structurize: the model is itself a bare {type(model).__name__}({d_in}, {d_out}), "
            f"which cannot be replaced in place (there is no parent to put the new layer in); "
            f"build the structured layer from it instead: "
            f"layer = make_linear('btt', {d_in}, {d_out}).from_linear(linear)"
        )
    raise ValueError(
        f"structurize: {type(model).__name__} has no nn.Linear (or Conv1D) layer to replace"
    )


@dataclass
class _Step:
    """One report row and, for a layer to replace, what replaces it:
    ``make_linear(spec, d_in, d_out, **opts)``."""

    row: SurgeryRow
    module: nn.Module | None = None
    spec: Any = None
    opts: dict[str, Any] | None = None
    probe: StructuredLinear | None = None  # the new layer on the meta device
    asked: str | None = None  # for an already structured layer: the spec this call asked for


def _plan(
    model: nn.Module,
    selection: TargetSelection,
    structure: type[StructuredLinear],
    options: dict[str, Any],
    overrides: Mapping[str, Any],
    dry_run: bool,
) -> list[_Step]:
    """The report rows, in module order: every already structured layer, the kept head, and
    every selected layer (replaced, dry-run or refused). Changes nothing."""
    modules = dict(model.named_modules())
    shared = _shared_weights(model)
    plan = []
    for decision in selection.decisions:
        name, module = decision.name, modules[decision.name]
        override = None if decision.override is None else overrides[decision.override]
        spec, opts = _resolve_spec(structure, options, override)
        if isinstance(module, StructuredLinear):
            asked = _asked_spec(module, spec, opts) if decision.action == REPLACE else None
            plan.append(_Step(_structured_row(name, module), asked=asked))
        elif decision.action == HEAD:
            plan.append(_Step(_kept_row(name, module, "kept (head)")))
        elif decision.action == REPLACE:
            parent_name = name.rpartition(".")[0]
            parent = modules[parent_name] if parent_name else model
            if isinstance(parent, nn.MultiheadAttention):
                plan.append(_Step(_in_proj_row(parent_name, parent)))
            refusal = _refusal(module, parent, shared)
            plan.append(_plan_replacement(name, module, spec, opts, refusal, dry_run))
    return plan


def _asked_spec(layer: StructuredLinear, spec: Any, opts: dict[str, Any]) -> str | None:
    """The spec of the layer this surgery would build in place of ``layer`` (None if it
    cannot be built, or has no spec)."""
    try:
        probe = make_linear(
            spec,
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device="meta",
            **opts,
        )
        return probe.spec
    except ValueError:
        return None


def _in_proj_row(name: str, mha: nn.MultiheadAttention) -> SurgeryRow:
    """The refused row of ``nn.MultiheadAttention``'s packed q/k/v projection, a parameter
    (``in_proj_weight``, ``(3 E, E)``) rather than a linear layer."""
    e = mha.embed_dim
    params = sum(
        p.numel()
        for p in (
            mha.in_proj_weight,
            mha.in_proj_bias,
            getattr(mha, "q_proj_weight", None),
            getattr(mha, "k_proj_weight", None),
            getattr(mha, "v_proj_weight", None),
        )
        if p is not None
    )
    macs = e * (e + mha.kdim + mha.vdim)
    status = (
        "refused: nn.MultiheadAttention's packed q/k/v projection (in_proj_weight) is a "
        "parameter, not a linear layer; to structure it, write the attention with separate "
        "nn.Linear q/k/v projections"
    )
    old = f"MultiheadAttention.in_proj({e}, {e + mha.kdim + mha.vdim})"
    return SurgeryRow(f"{name}.in_proj", old, "-", params, params, macs, macs, status)


def _plan_replacement(
    name: str,
    module: nn.Module,
    spec: Any,
    opts: dict[str, Any],
    refusal: str | None,
    dry_run: bool,
) -> _Step:
    """The row of a selected layer: refused, or the new layer's params and MACs, read off a
    probe built on the meta device (no memory, no init)."""
    if refusal is not None:
        return _Step(_kept_row(name, module, refusal))
    d_in, d_out = linear_dims(module)
    bias = module.bias is not None
    try:
        probe = make_linear(
            spec, d_in, d_out, bias=bias, device="meta", dtype=module.weight.dtype, **opts
        )
    except ValueError as err:
        return _Step(_kept_row(name, module, f"refused: {err}"))
    row = SurgeryRow(
        name,
        _describe_old(module),
        _describe_new(probe),
        _param_count(module),
        probe.num_params,
        d_in * d_out,
        probe.macs(),
        "dry-run" if dry_run else "replaced",
        taxonomy=_taxonomy_text(probe),
        padding=_padding_text(probe),
    )
    return _Step(row, module, spec, opts, probe)


def _padding_text(layer: StructuredLinear) -> str:
    sides = [
        f"{side} {size}->{padded}"
        for side, size, padded in (
            ("in", layer.in_features, layer.in_padded),
            ("out", layer.out_features, layer.out_padded),
        )
        if padded != size
    ]
    return ", ".join(sides)


def _structured_row(name: str, layer: StructuredLinear) -> SurgeryRow:
    params, macs = layer.num_params, layer.macs()
    s = layer.spec if layer.structure else type(layer).__name__
    taxonomy = _taxonomy_text(layer)
    row = SurgeryRow(name, s, s, params, params, macs, macs, "already structured", None, taxonomy)
    row.padding = _padding_text(layer)
    return row


def _taxonomy_text(layer: nn.Module) -> str:
    taxonomy = getattr(layer, "taxonomy", None)
    return str(taxonomy()) if callable(taxonomy) else ""


def _config_after(model: nn.Module, plan: list[_Step], init: str, dry_run: bool) -> StructureConfig:
    """The model's structure config; a dry run adds the layers it would have created."""
    config = structure_config(model)
    if not dry_run:
        return config
    planned = [
        replace(entry_for(step.row.name, step.probe), base=type(step.module).__name__, init=init)
        for step in plan
        if step.probe is not None
    ]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    entries = sorted([*config.modules, *planned], key=lambda e: order[e.path])
    return StructureConfig(tuple(entries))


def _kept_row(name: str, module: nn.Module, status: str) -> SurgeryRow:
    """A layer that stays dense: the head, or a refusal."""
    d_in, d_out = linear_dims(module)
    params, macs = _param_count(module), d_in * d_out
    return SurgeryRow(name, _describe_old(module), "-", params, params, macs, macs, status)


def _replace(model: nn.Module, plan: list[_Step], init: str) -> None:
    """Swap the planned structured layers into ``model``."""
    for step in plan:
        if step.module is None:
            continue
        parent_name, _, child = step.row.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        d_in, d_out = linear_dims(step.module)
        new = _build(step.module, step.spec, step.opts, init, d_in, d_out)
        if init == "from_dense":
            step.row.error = _relative_error(step.module, new)
        setattr(parent, child, new)


@torch.no_grad()
def _relative_error(module: nn.Module, layer: StructuredLinear) -> float:
    """``||W - W'||_F / ||W||_F`` in float64 (0 when ``W`` is 0 and so is the fit)."""
    w = module.weight.T if is_conv1d(module) else module.weight
    w = w.detach().double()
    diff = float(torch.linalg.matrix_norm(layer.to_dense().double() - w))
    norm = float(torch.linalg.matrix_norm(w))
    return diff / norm if norm > 0 else diff


def _warn_and_check(
    selection: TargetSelection, report: SurgeryReport, dense_names: list[str]
) -> None:
    """Warn about patterns that matched nothing and layers kept dense; raise if the surgery
    selected nothing at all."""
    candidates = f"{dense_names[:20]}{' ...' if len(dense_names) > 20 else ''}"
    for kind, keys in (
        ("target", selection.unmatched_targets),
        ("override", selection.unmatched_overrides),
    ):
        for key in keys:
            warnings.warn(
                f"structurize: {kind} pattern {key!r} matched no linear layer; candidates are "
                f"{candidates}",
                stacklevel=3,
            )
    if report.refused:
        warnings.warn(
            "structurize kept some layers dense:\n"
            + "\n".join(f"  {r.name}: {r.status}" for r in report.refused),
            stacklevel=3,
        )
    if not report.replaced and not any(r.status == "already structured" for r in report):
        if report.refused:  # the real cause: every selected layer was refused
            causes = dict.fromkeys(r.status.removeprefix("refused: ") for r in report.refused)
            raise ValueError(
                "structurize: every selected layer was refused, the model is unchanged:\n  "
                + "\n  ".join(list(causes)[:5])
            )
        raise ValueError(
            "structurize: no layer was selected, the model is unchanged; check target_modules / "
            f"exclude_modules. Linear layers in this model: {dense_names[:20]}"
        )


def _warn_restructure(plan: list[_Step], selection: TargetSelection) -> None:
    """Warn about selected layers that an earlier surgery structured otherwise: they are kept."""
    differ = [
        f"{step.row.name!r} is {step.row.old!r}, asked for {step.asked!r}"
        for step in plan
        if step.asked is not None
        and step.row.status == "already structured"
        and step.asked != step.row.old
    ]
    if differ:
        warnings.warn(
            "structurize: these layers were already structured differently and were left as "
            "they are:\n  " + "\n  ".join(differ) + "\nTo re-structure them, structurize the "
            "dense model (build it again, or load its dense weights) rather than the structured "
            "one, or replace each layer by hand: make_linear(<spec>, d_in, d_out).from_dense("
            "layer.to_dense())",
            stacklevel=3,
        )


def _check_options(
    cls: type[StructuredLinear], options: Mapping[str, Any], where: str = ""
) -> None:
    at = f" (override {where!r})" if where else ""
    names = set(options) - {"device", "dtype"}
    check_options(f"structurize: structure {cls.structure!r}{at}", names, structure_options(cls))


def _param_count(module: nn.Module) -> int:
    # A lazy layer's parameters have no size yet; it is refused and counted as 0.
    lazy = nn.parameter.UninitializedParameter
    return sum(p.numel() for p in module.parameters() if not isinstance(p, lazy))


def _describe_new(layer: StructuredLinear) -> str:
    # The layer's spec string: parse_spec/make_linear read it back to the same layer.
    return layer.spec


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
    # Plain Python data on the module (never on a tensor), read by structure_config.
    setattr(new, ORIGIN_ATTR, (type(module).__name__, init))
    return new
