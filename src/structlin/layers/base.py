"""The contract every structured linear layer honours.

A structured layer computes ``y = x W^T + b`` like :class:`torch.nn.Linear`, but ``W`` is never
stored or formed: it is an implicit product of smaller learnable *factors*. Each factor is a
(possibly batched) dense map with its own fan-in and fan-out, and those fans drive μP: the
initialisation std of every factor and, later, its learning-rate multiplier.

Conventions shared by all structures:

* Every factor is stored as ``(*batch, fan_out, fan_in)``, the layout of ``nn.Linear.weight``
  with optional leading batch dimensions (one dense block per batch index).
* FLOPs are **multiply-accumulates (MACs) of the forward pass**, one per fused multiply-add, the
  convention of fvcore and of the paper's FLOP axes. ``torch.utils.flop_counter.FlopCounterMode``
  counts 2 per MAC, so its total is ``2 * layer.macs(batch)``. The bias addition, padding and
  reshapes are not counted; computations on zero-padded rows and columns are.
* ``factors()`` is the single source of per-factor metadata. Nothing is stored on tensors.
* Widths that do not factorise well are zero-padded to ``in_padded`` / ``out_padded``; the input
  is zero-padded on the right and the output truncated, so padding never changes the function's
  shape, only its cost.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..options import check_positive_int

__all__ = ["NORMS", "Factor", "StructuredLinear", "mup_init_std"]

#: Weight normalisations accepted by the ``norm`` option of every structure.
NORMS = ("rms_clamp",)
_NORM_EPS = 1e-8


class Factor(NamedTuple):
    """One learnable factor of a structured layer.

    Attributes:
        name: the parameter's name inside the layer (``layer.get_parameter(name)``).
        tensor: the parameter itself, shape ``(*batch, fan_out, fan_in)`` (TT cores have no batch).
        fan_in: input size of one dense block of this factor.
        fan_out: output size of one dense block of this factor.
    """

    name: str
    tensor: torch.Tensor
    fan_in: int
    fan_out: int


def mup_init_std(fan_in: int, fan_out: int) -> float:
    """Spectral μP init std ``sqrt(min(fan_in, fan_out)) / fan_in``.

    A Gaussian ``fan_out x fan_in`` matrix with this std has spectral norm
    ``Θ(sqrt(fan_out / fan_in))``, the μP target (Yang et al.; reference §2.1).
    """
    return math.sqrt(min(fan_in, fan_out)) / fan_in


def _rms_ratio(f: Factor) -> torch.Tensor:
    return f.tensor.square().mean().add(_NORM_EPS).sqrt() / mup_init_std(f.fan_in, f.fan_out)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # device types without autocast support, e.g. "meta"
        return False


class StructuredLinear(nn.Module):
    """Base class of all structured layers: ``y = x W^T + b`` with ``W`` implicit.

    Subclasses create their factors in ``__init__`` (after calling ``super().__init__`` and
    setting ``in_padded`` / ``out_padded`` when they pad; ``self._factory`` holds the device and
    dtype), then call ``self._finish_init()``, and implement:

    * ``_factor_fans()``: ``[(param_name, fan_in, fan_out), ...]`` in forward order; the last entry
      is the factor closest to the output (the one zeroed by ``zero_init_last``);
    * ``_reference_matmul(x, weights)``: plain einsum/matmul path on ``(N, in_padded)`` inputs;
    * optionally ``_matmul(x, weights)``: a faster path (defaults to the reference);
    * optionally ``_macs_per_example()`` (defaults to the factors' element count, correct for
      every structure without weight sharing) and ``_from_dense_padded(W)``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias (initialised to zero, as μP prescribes).
        norm: ``None`` or ``"rms_clamp"``: weight normalisation of every factor (Qiu et al. §3).
            Each factor ``W_t`` is used as ``gamma_t * W_t / max(1, rms(W_t) / sigma_t)`` with
            ``sigma_t`` its μP init std: a factor's RMS may shrink freely but never exceed its
            init value. The stored parameter is unchanged; the clamp lives in the forward graph.
            Costs ``O(params)`` per forward, independent of the batch, so FLOPs are unchanged.
        learn_gamma: with ``norm``, learn one scalar gain ``gamma_t`` per factor (init 1,
            parameters ``gammas.t``). Use False for Q/K projections under QK-LayerNorm, where the
            scale is irrelevant.
        device, dtype: factory kwargs for the parameters, as in ``nn.Linear``.
    """

    #: Registry name, set by :func:`structlin.register_structure`.
    structure: ClassVar[str] = ""

    in_features: int
    out_features: int
    in_padded: int
    out_padded: int

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        norm: str | None = None,
        learn_gamma: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_features = check_positive_int(owner, "in_features", in_features)
        self.out_features = check_positive_int(owner, "out_features", out_features)
        self.in_padded = in_features
        self.out_padded = out_features
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"{owner}: dtype must be a floating-point dtype, got {dtype}")
        if norm is not None and norm not in NORMS:
            raise ValueError(f"{owner}: norm must be None or one of {NORMS}, got {norm!r}")
        self.norm = norm
        self.learn_gamma = bool(learn_gamma)
        self._factory = {"device": device, "dtype": dtype}
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ to implement
    def _factor_fans(self) -> list[tuple[str, int, int]]:
        raise NotImplementedError

    def _reference_matmul(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _matmul(
        self, x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None
    ) -> torch.Tensor:
        """Fast path; ``bias`` is given only when the output is not padded, so it may be fused."""
        y = self._reference_matmul(x, weights)
        return y if bias is None else y + bias

    def _macs_per_example(self) -> int:
        return sum(f.tensor.numel() for f in self.factors())

    def _from_dense_padded(self, weight: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement from_dense")

    def _options_repr(self) -> str:
        return ""

    def _finish_init(self) -> None:
        """Create the weight-norm gains (if any) and initialise; call at the end of ``__init__``."""
        # Fans are fixed once the factors exist; plain Python data, cached to keep forward lean.
        self._fans = tuple(self._factor_fans())
        self._paths = tuple(tuple(name.split(".")) for name, _, _ in self._fans)
        if self.norm is not None and self.learn_gamma:
            self.gammas = nn.ParameterList(
                nn.Parameter(torch.ones((), **self._factory)) for _ in self._factor_fans()
            )
        else:
            self.gammas = None
        self.reset_parameters()

    def _plan_widths(
        self,
        cores: int,
        in_factors: tuple[int, ...] | None,
        out_factors: tuple[int, ...] | None,
        pad_tolerance: float,
    ) -> int:
        """Factorise both widths into ``cores`` factors (zero-padding if needed); sets
        ``in_factors``, ``out_factors``, ``in_padded``, ``out_padded``. Returns ``cores``."""
        from .factorize import plan_factors

        name = self._name()
        cores = check_positive_int(name, "cores", cores)
        if cores < 2:
            raise ValueError(f"{name}: cores must be at least 2, got {cores}")
        plans = [
            plan_factors(size, cores, factors, pad_tolerance=pad_tolerance, what=what, owner=name)
            for size, factors, what in (
                (self.in_features, in_factors, "in_features"),
                (self.out_features, out_factors, "out_features"),
            )
        ]
        self.in_factors, self.out_factors = plans[0].factors, plans[1].factors
        self.in_padded, self.out_padded = plans[0].padded, plans[1].padded
        return cores

    # ------------------------------------------------------------------ factors and init
    def factors(self) -> list[Factor]:
        """One :class:`Factor` record per learnable factor, in forward order."""
        return [
            Factor(name, t, fan_in, fan_out)
            for (name, fan_in, fan_out), t in zip(self._fans, self._tensors(), strict=True)
        ]

    def _tensors(self) -> list[torch.Tensor]:
        # Attribute lookup rather than get_parameter: torch.func.functional_call and
        # parametrizations substitute plain tensors for the parameters.
        out = []
        for path in self._paths:
            obj = self
            for part in path:
                obj = getattr(obj, part)
            out.append(obj)
        return out

    def _weights(self) -> list[torch.Tensor]:
        """The factor tensors the forward pass uses, in forward order (weight-normalised)."""
        if self.norm is None:
            return self._tensors()
        out = []
        for i, f in enumerate(self.factors()):
            w = f.tensor / torch.clamp(_rms_ratio(f), min=1.0)
            if self.gammas is not None:
                w = w * self.gammas[i]
            out.append(w)
        return out

    def rms_ratios(self) -> list[torch.Tensor]:
        """Each stored factor's RMS over its μP init std, ``RMS(W_t) / σ_t``, in forward order.

        ``σ_t = mup_init_std(fan_in, fan_out)``, so every ratio is about 1 right after
        :meth:`reset_parameters` (0 for a zero-initialised factor). ``norm="rms_clamp"`` divides a
        factor by ``max(1, ratio)``: a ratio above 1 is growth the clamp removes, and without a
        norm it is growth the forward pass sees. 0-dim tensors, differentiable.
        """
        return [_rms_ratio(f) for f in self.factors()]

    def reset_parameters(self, zero_init_last: bool = False) -> None:
        """Draw every factor from ``N(0, mup_init_std(fan_in, fan_out)^2)``; zero the bias.

        With ``zero_init_last=True`` only the last factor is zeroed (μP's zero-initialised readout
        and residual-branch outputs): the layer's output starts at exactly 0; the first step moves
        only the last factor (the others see a zero gradient through it), and from the second step
        on every factor trains. Zeroing all factors instead would leave them stuck at zero.
        """
        factors = self.factors()
        with torch.no_grad():
            for i, f in enumerate(factors):
                if zero_init_last and i == len(factors) - 1:
                    f.tensor.zero_()
                else:
                    f.tensor.normal_(0.0, mup_init_std(f.fan_in, f.fan_out))
            if self.bias is not None:
                self.bias.zero_()
            for gamma in getattr(self, "gammas", None) or ():
                gamma.fill_(1.0)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{self._name()}: expected a torch.Tensor input, got {type(x)}")
        if not x.is_floating_point():
            raise ValueError(
                f"{self._name()}: expected a floating-point input, got dtype {x.dtype}; "
                f"convert it first, e.g. x.float()"
            )
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self._name()}: expected input of shape (..., {self.in_features}), "
                f"got {tuple(x.shape)}"
            )

    def _name(self) -> str:
        cls = type(self).__name__
        return f"{cls}(in_features={self.in_features}, out_features={self.out_features})"

    def _run(self, x: torch.Tensor, reference: bool) -> torch.Tensor:
        self._check_input(x)
        lead = x.shape[:-1]
        weights = self._weights()
        bias = self.bias
        device_type = x.device.type
        if _autocast_enabled(device_type):
            # Cast like nn.Linear does under autocast, then run the kernels with autocast off so a
            # custom backward sees the same dtypes as its forward.
            dtype = torch.get_autocast_dtype(device_type)
            x = x.to(dtype)
            weights = [w.to(dtype) for w in weights]
            bias = bias.to(dtype) if bias is not None else None
            with torch.autocast(device_type, enabled=False):
                return self._run_cast(x, weights, bias, lead, reference)
        return self._run_cast(x, weights, bias, lead, reference)

    def _run_cast(
        self,
        x: torch.Tensor,
        weights: list[torch.Tensor],
        bias: torch.Tensor | None,
        lead: torch.Size,
        reference: bool,
    ) -> torch.Tensor:
        flat = x.dim() != 2
        if flat:  # 2-D inputs skip the reshapes (and their autograd nodes)
            x = x.reshape(math.prod(lead), self.in_features)
        if self.in_padded != self.in_features:
            x = F.pad(x, (0, self.in_padded - self.in_features))
        padded_out = self.out_padded != self.out_features
        if reference:
            y = self._reference_matmul(x, weights)
        else:
            y = self._matmul(x, weights, None if padded_out else bias)
            if not padded_out:
                bias = None  # already added
        if padded_out:
            y = y[:, : self.out_features]
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, self.out_features) if flat else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x W^T + b`` for ``x`` of shape ``(..., in_features)``; ``W`` is never formed."""
        return self._run(x, reference=False)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward` through the plain einsum/matmul path (for tests and FLOP
        counting with ``FlopCounterMode``)."""
        return self._run(x, reference=True)

    # ------------------------------------------------------------------ dense conversion
    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` matrix ``W`` this layer represents."""
        return self._dense_padded()[: self.out_features, : self.in_features]

    def _dense_padded(self) -> torch.Tensor:
        weights = self._weights()
        ref = weights[0]
        eye = torch.eye(self.in_padded, device=ref.device, dtype=ref.dtype)
        return self._reference_matmul(eye, weights).T

    @torch.no_grad()
    def from_dense(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> StructuredLinear:
        """Set the factors to a good approximation of the dense ``weight`` (``out x in``).

        Exact whenever the structure can represent ``weight``. The projection used is structure
        specific (truncated SVD, blockwise SVD, TT-SVD, block extraction); afterwards the scale is
        spread evenly over the factors (each factor's RMS relative to its μP init std is made
        equal), which leaves the product unchanged. With ``norm="rms_clamp"`` the gains are set so
        that the clamp does not shrink the fit (without learnable gains, ``learn_gamma=False``, a
        factor above its init RMS is shrunk). ``bias``, when given, is copied. Returns self.
        """
        expected = (self.out_features, self.in_features)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != expected:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight)
            raise ValueError(
                f"{self._name()}.from_dense: expected a weight of shape {expected}, got {got}"
            )
        if bias is not None:
            if self.bias is None:
                raise ValueError(
                    f"{self._name()}.from_dense: got a bias but the layer has bias=False"
                )
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(
                    f"{self._name()}.from_dense: expected a bias of shape ({self.out_features},), "
                    f"got {tuple(bias.shape)}"
                )
        ref = self._weights()[0]
        w = weight.detach().to(device=ref.device, dtype=torch.float64)
        w = F.pad(w, (0, self.in_padded - self.in_features, 0, self.out_padded - self.out_features))
        self._from_dense_padded(w)
        self._balance_scales()
        if self.gammas is not None:
            # Undo the clamp the forward would apply, so the normalised factors equal the fit.
            for gamma, f in zip(self.gammas, self.factors(), strict=True):
                rms = f.tensor.double().square().mean().add(_NORM_EPS).sqrt().item()
                gamma.fill_(max(1.0, rms / mup_init_std(f.fan_in, f.fan_out)))
        if bias is not None:
            self.bias.copy_(bias)
        return self

    def from_linear(self, linear: nn.Linear) -> StructuredLinear:
        """Approximate an ``nn.Linear`` (weight and bias) with this layer's factors. Returns self.

        A Linear without bias zeroes this layer's bias, so the two compute the same function."""
        if not hasattr(linear, "weight") or linear.weight.dim() != 2:
            raise ValueError(
                f"{self._name()}.from_linear: expected an nn.Linear, got {type(linear)}"
            )
        bias = getattr(linear, "bias", None)
        if bias is not None and self.bias is None:
            raise ValueError(
                f"{self._name()}.from_linear: the Linear has a bias but this layer has bias=False; "
                f"build the layer with bias=True"
            )
        if bias is None and self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()
        return self.from_dense(linear.weight, bias)

    @torch.no_grad()
    def _balance_scales(self) -> None:
        factors = self.factors()
        if len(factors) < 2:
            return
        gains = []
        for f in factors:
            rms = f.tensor.double().pow(2).mean().sqrt().item()
            gains.append(rms / mup_init_std(f.fan_in, f.fan_out))
        if min(gains) == 0.0:
            return
        target = math.exp(sum(math.log(g) for g in gains) / len(gains))
        for f, g in zip(factors, gains, strict=True):
            f.tensor.mul_(target / g)

    # ------------------------------------------------------------------ accounting
    def macs(self, batch: int = 1) -> int:
        """Forward multiply-accumulates for ``batch`` rows (bias excluded, padding included)."""
        return int(batch) * self._macs_per_example()

    @property
    def num_params(self) -> int:
        """Number of learnable scalars, bias included."""
        return sum(p.numel() for p in self.parameters())

    @property
    def dense_params(self) -> int:
        """Parameters of the ``nn.Linear`` this layer replaces."""
        return self.in_features * self.out_features + (
            self.out_features if self.bias is not None else 0
        )

    @property
    def dense_macs(self) -> int:
        """Forward MACs per example of the ``nn.Linear`` this layer replaces."""
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        parts.append(f"bias={self.bias is not None}")
        opts = self._options_repr()
        if opts:
            parts.append(opts)
        if self.norm is not None:
            parts.append(f"norm={self.norm!r}, learn_gamma={self.learn_gamma}")
        if (self.in_padded, self.out_padded) != (self.in_features, self.out_features):
            parts.append(f"padded=({self.in_padded}, {self.out_padded})")
        shapes = ", ".join(f"{f.name}{tuple(f.tensor.shape)}" for f in self.factors())
        parts.append(f"factors=[{shapes}]")
        parts.append(f"params={self.num_params / self.dense_params:.3g}x dense")
        parts.append(f"macs={self.macs() / self.dense_macs:.3g}x dense")
        return ", ".join(parts)
