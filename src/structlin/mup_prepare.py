"""Make a model written for standard parametrisation ready for μP: :func:`prepare`.

:func:`structlin.mup.param_groups` gives every layer its μP learning rate, but μP also fixes the
initialisation (Qiu et al., ICML 2024, Section 3; Yang, Simon & Bernstein 2023): every matrix
starts at the spectral scale ``N(0, mup_init_std(fan_in, fan_out)^2)``, the readout starts at
zero, and the paper's models also start every residual-branch output projection at zero. A model
written for standard parametrisation (e.g. a Hugging Face GPT-2 with its fixed ``N(0, 0.02)``)
has none of this. :func:`prepare` re-initialises what it can, in place, and returns a
:class:`PrepareReport` of what it changed and of what it cannot change, each with the fix.

What only the model's code or config can change, and is therefore reported, not changed:

* attention logits scaled by ``1/sqrt(d_head)``: μP needs ``1/d_head`` once ``d_head`` grows
  with width; with ``d_head`` fixed (heads added as width grows) ``1/sqrt(d_head)`` is a constant
  and μP holds. Given ``base=`` (the model at its base width, e.g. on the meta device),
  :func:`prepare` compares the two ``d_head`` and reports the scale as kept when they agree;
  without it, it cannot tell and reports the scale;
* a readout tied to the input embedding: it cannot start at zero without zeroing the embedding;
* parameters of modules it does not recognise.

Embeddings keep their width-independent init (μP's input-layer init) and norm gains their init
of 1; :func:`~structlin.mup.param_groups` trains both at LR ×1 without weight decay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .layers import StructuredLinear, mup_init_std
from .linear_like import is_conv1d, is_linear_like, linear_dims
from .targets import REPLACE, Pattern, output_head, select_targets

__all__ = ["RESIDUAL_OUTPUTS", "PrepareReport", "PrepareRow", "prepare"]

#: Name suffixes of residual-branch output projections, the last linear layer of a branch whose
#: output is added to the residual stream: GPT-2 ``attn.c_proj``/``mlp.c_proj``, Llama/Mistral
#: ``o_proj``/``down_proj``, BERT/ViT ``attention.output.dense``/``output.dense``, BART/OPT/CLIP
#: ``out_proj``/``fc2``, GPT-NeoX ``dense_4h_to_h``, T5 ``wo``, the lab's GPT-2 ``mlp_proj``.
RESIDUAL_OUTPUTS = (
    "c_proj",
    "o_proj",
    "down_proj",
    "output.dense",
    "out_proj",
    "fc2",
    "dense_4h_to_h",
    "wo",
    "mlp_proj",
)

#: Actions of a report row.
INIT, ZEROED, KEPT, CANNOT, UNCHANGED = "μP init", "zeroed", "kept", "cannot change", "unchanged"


@dataclass(frozen=True)
class PrepareRow:
    """One module seen by :func:`prepare`.

    Attributes:
        name: the module's name (``""`` for the model itself).
        kind: ``readout``, ``residual``, ``linear``, ``embedding``, ``norm``, ``attention`` or
            ``unrecognised``.
        action: ``"μP init"``, ``"zeroed"``, ``"kept"`` (already μP-compatible), ``"cannot
            change"`` (only the model's code or config can) or ``"unchanged"`` (``keep_weights``).
        detail: what was done, or why not and the concrete fix.
    """

    name: str
    kind: str
    action: str
    detail: str


class PrepareReport(list):
    """The rows of :func:`prepare`, printable as a table (``print(report)``)."""

    readout: str | None = None

    @property
    def changed(self) -> list[str]:
        """Names of the modules whose weights were re-initialised or zeroed."""
        return [r.name for r in self if r.action in (INIT, ZEROED)]

    @property
    def cannot_change(self) -> list[PrepareRow]:
        """What keeps the model from μP and only its code or config can fix."""
        return [r for r in self if r.action == CANNOT]

    def to_dict(self) -> dict[str, Any]:
        """``{"readout", "changed", "cannot_change", "rows"}``, JSON-serialisable."""
        return {
            "readout": self.readout,
            "changed": self.changed,
            "cannot_change": [r.name for r in self.cannot_change],
            "rows": [asdict(r) for r in self],
        }

    def __str__(self) -> str:
        header = ("module", "kind", "action", "detail")
        body = [(r.name or "(model)", r.kind, r.action, r.detail) for r in self]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(3)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines = [fmt.format(*header), fmt.format(*("-" * w for w in [*widths, 6]))]
        lines += [fmt.format(*row) for row in body]
        n_fix = len(self.cannot_change)
        lines.append(
            f"{len(self.changed)} layer(s) re-initialised for μP; {n_fix} thing(s) only the "
            f"model's code or config can change" + (" (see above)" if n_fix else "")
        )
        return "\n".join(lines)

    __repr__ = __str__


def prepare(
    model: nn.Module,
    *,
    readout: str | None = "auto",
    zero_init_residual: bool = True,
    residual_modules: Pattern = RESIDUAL_OUTPUTS,
    keep_weights: bool = False,
    seed: int | None = None,
    base: nn.Module | None = None,
) -> PrepareReport:
    """Initialise ``model`` in place for μP training from scratch; return what changed and what
    cannot change.

    * Every dense linear layer (``nn.Linear``, transformers' ``Conv1D``) of shape ``d_in -> d_out``
      is drawn from ``N(0, mup_init_std(d_in, d_out)^2)``, ``sqrt(min(d_in, d_out)) / d_in``,
      whose spectral norm is ``Θ(sqrt(d_out / d_in))``; biases start at zero.
    * Every structured layer gets ``reset_parameters()``: each factor at its own spectral scale.
    * The readout starts at zero (a structured readout: its last factor, ``zero_init_last``), and
      with ``zero_init_residual`` so does every residual output projection, as in the paper's
      models: each block then starts as the identity and the logits at exactly zero.

    Args:
        model: any ``nn.Module``, dense or already structured (``structurize`` composes in either
            order: a zeroed dense layer is structured with ``zero_init_last``).
        readout: ``"auto"`` finds the output layer: ``model.get_output_embeddings()``, else the
            last linear layer named one of ``lm_head, head, classifier, output, fc_out``, else
            the last linear layer; a module name picks it; ``None``: no readout is zeroed.
        zero_init_residual: zero the residual output projections as well.
        residual_modules: which layers those are: a list of names or name suffixes (default
            :data:`RESIDUAL_OUTPUTS`) or a regex on full names, as ``structurize``'s targets.
        keep_weights: change no weight, only report what would change. Use it for a pretrained
            model or one structured with ``init="from_dense"``: re-initialising would destroy
            the weights (or their compression); ``param_groups`` still gives the μP learning rates.
        seed: draw the new weights from this seed (the global RNG is restored afterwards), so that
            a second call gives the same weights; ``None`` uses the global RNG.
        base: the same architecture at the base width (the ``base`` of
            :func:`~structlin.mup.param_groups`; the meta device costs nothing). Only read, to
            tell whether each attention module's ``d_head`` grows with width: if it does not,
            its ``1/sqrt(d_head)`` scale is width-independent and reported as kept.

    Returns:
        A :class:`PrepareReport`; calling ``prepare`` again gives the same report.
    """
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if n and is_linear_like(m)]
    head = _find_readout(model, linear, readout)
    residual = set(_residual_names(linear, head, residual_modules)) if zero_init_residual else set()
    shared = _shared_owners(model)
    report = PrepareReport()
    report.readout = head
    with _seeded(model, seed):
        for name in linear:
            kind = "readout" if name == head else "residual" if name in residual else "linear"
            report.append(_init_linear(name, modules[name], kind, shared, keep_weights))
    report += _other_rows(model, linear, shared, base)
    if zero_init_residual and not residual:
        report.append(_no_residual_row(linear, residual_modules))
    return report


def _no_residual_row(linear: list[str], pattern: Pattern) -> PrepareRow:
    return PrepareRow(
        "",
        "residual",
        CANNOT,
        f"no linear layer matches residual_modules={pattern!r}; name the residual output "
        f"projections explicitly (linear layers: {linear[:12]})",
    )


def _find_readout(model: nn.Module, linear: list[str], readout: str | None) -> str | None:
    """The readout's name: see :func:`prepare`'s ``readout``."""
    if readout is None:
        return None
    if readout != "auto":
        if readout not in linear:
            raise ValueError(
                f"prepare: readout {readout!r} is not a linear layer of the model; linear "
                f"layers: {linear[:20]}{' ...' if len(linear) > 20 else ''}"
            )
        return readout
    return output_head(model, linear)[0]  # the same rule as surgery's head


def _residual_names(linear: list[str], head: str | None, pattern: Pattern) -> list[str]:
    selection = select_targets(linear, None, pattern)
    return [d.name for d in selection.decisions if d.action == REPLACE and d.name != head]


def _shared_owners(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): [module names holding it]}`` for parameters held by several modules."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name.rpartition(".")[0])
    return {k: v for k, v in owners.items() if len(v) > 1}


@contextlib.contextmanager
def _seeded(model: nn.Module, seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _init_linear(
    name: str, module: nn.Module, kind: str, shared: dict[int, list[str]], keep: bool
) -> PrepareRow:
    """Re-initialise one linear-like layer (zeroed if it is the readout or a residual output)."""
    zero = kind in ("readout", "residual")
    tied = [] if isinstance(module, StructuredLinear) else shared.get(id(module.weight), [])
    if tied:
        others = [o for o in tied if o != name]
        return PrepareRow(
            name,
            kind,
            CANNOT,
            f"weight tied to {others}: it cannot be {'zeroed' if zero else 're-initialised'} "
            f"without changing {others} too; untie it (transformers: tie_word_embeddings=False "
            f"in the config) and call prepare again",
        )
    what = _describe_init(module, zero)
    if keep:
        return PrepareRow(name, kind, UNCHANGED, f"keep_weights: would set {what}")
    with torch.no_grad():
        if isinstance(module, StructuredLinear):
            module.reset_parameters(zero_init_last=zero)
        else:
            d_in, d_out = linear_dims(module)
            if zero:
                module.weight.zero_()
            else:
                module.weight.normal_(0.0, mup_init_std(d_in, d_out))
            if module.bias is not None:
                module.bias.zero_()
    return PrepareRow(name, kind, ZEROED if zero else INIT, what)


def _describe_init(module: nn.Module, zero: bool) -> str:
    d_in, d_out = linear_dims(module)
    if isinstance(module, StructuredLinear):
        fans = ", ".join(
            f"{f.name} σ={mup_init_std(f.fan_in, f.fan_out):.3g}" for f in module.factors()
        )
        last = " (last factor zero)" if zero else ""
        return f"{module.structure or type(module).__name__} {d_in}->{d_out}: {fans}{last}"
    layout = "Conv1D" if is_conv1d(module) else "Linear"
    if zero:
        return f"{layout} {d_in}->{d_out}: weight 0"
    return f"{layout} {d_in}->{d_out}: N(0, {mup_init_std(d_in, d_out):.3g}²)"


def _other_rows(
    model: nn.Module, linear: list[str], shared: dict[int, list[str]], base: nn.Module | None
) -> list[PrepareRow]:
    """Rows for everything but the linear layers: embeddings, norms, attention, the rest."""
    rows: list[PrepareRow] = []
    inside = tuple(n + "." for n in linear)
    for name, module in model.named_modules():
        if name in linear or name.startswith(inside):
            continue
        row = _attention_row(name, module, _base_module(base, name))
        if row is not None:
            rows.append(row)
        params = [(n, p) for n, p in module.named_parameters(recurse=False)]
        if not params:
            continue
        if isinstance(module, nn.Embedding):
            rows.append(_embedding_row(name, module, shared))
        elif _is_norm(module):
            rows.append(
                PrepareRow(
                    name,
                    "norm",
                    KEPT,
                    f"learnable gains {[n for n, _ in params]} kept at their init; "
                    "mup.param_groups trains them at LR ×1 without weight decay, as μP asks "
                    "(with another optimizer setup, exclude them from weight decay)",
                )
            )
        elif any(p.dim() >= 2 for _, p in params):
            rows.append(_unrecognised_row(name, module, params))
    return rows


def _is_norm(module: nn.Module) -> bool:
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
    return isinstance(module, norms) or type(module).__name__.endswith("Norm")


def _embedding_row(name: str, module: nn.Embedding, shared: dict[int, list[str]]) -> PrepareRow:
    std = float(module.weight.detach().float().std()) if not module.weight.is_meta else float("nan")
    tied = [o for o in shared.get(id(module.weight), []) if o != name]
    note = f"; shared with {tied} (tied readout: see its row)" if tied else ""
    return PrepareRow(
        name,
        "embedding",
        KEPT,
        f"{module.num_embeddings}x{module.embedding_dim}, std {std:.3g}: a width-independent "
        f"init is μP's input-layer init{note}",
    )


def _base_module(base: nn.Module | None, name: str) -> nn.Module | None:
    if base is None:
        return None
    try:
        return base.get_submodule(name)
    except AttributeError:
        return None


def _sqrt_d_head_scaled(module: nn.Module | None) -> int | None:
    """``d_head`` of an attention module whose logit scale is ``1/sqrt(d_head)``, else None."""
    if isinstance(module, nn.MultiheadAttention):
        return module.head_dim
    scaling = getattr(module, "scaling", None)
    d_head = getattr(module, "head_dim", getattr(module, "attention_head_size", None))
    if not isinstance(scaling, float) or not isinstance(d_head, int):
        return None
    if abs(scaling * d_head**0.5 - 1.0) > 1e-6:
        return None  # some other scale (e.g. already 1/d_head): nothing to say from one model
    return d_head


def _attention_row(name: str, module: nn.Module, base: nn.Module | None) -> PrepareRow | None:
    """A row for an attention module whose logit scale is ``1/sqrt(d_head)``: kept if ``base``
    (the module at the base width) has the same ``d_head``, else what only the model can fix."""
    d_head = _sqrt_d_head_scaled(module)
    if d_head is None:
        return None
    base_d_head = _sqrt_d_head_scaled(base)
    if base_d_head == d_head:
        return PrepareRow(
            name,
            "attention",
            KEPT,
            f"logits scaled by 1/sqrt(d_head), d_head={d_head} as in the base model: the head "
            f"size does not grow with width, so the scale is a constant and μP holds",
        )
    grows = f" (base model: d_head={base_d_head})" if base_d_head is not None else ""
    check = "" if base is not None else "; pass base= to check whether d_head grows"
    return PrepareRow(
        name,
        "attention",
        CANNOT,
        f"logits scaled by 1/sqrt(d_head), d_head={d_head}{grows}: μP needs 1/d_head if d_head "
        f"grows with width; keep d_head fixed and grow the number of heads (heads = width // "
        f"{d_head}), or set this module's scaling to sqrt(d_head_base) / d_head{check}",
    )


def _unrecognised_row(
    name: str, module: nn.Module, params: list[tuple[str, torch.Tensor]]
) -> PrepareRow:
    shapes = ", ".join(f"{n}{tuple(p.shape)}" for n, p in params)
    return PrepareRow(
        name,
        "unrecognised",
        CANNOT,
        f"{type(module).__name__} with {shapes} left at its own init; check its role and LR with "
        f"mup.describe, and initialise an (out, in) matrix from N(0, mup_init_std(in, out)²)",
    )
