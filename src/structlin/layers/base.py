"""The contract every structured linear layer honours.

A structured layer computes ``y = x W^T + b`` like :class:`torch.nn.Linear`, but ``W`` is never
stored or formed: it is an implicit product of smaller learnable *factors*. Each factor is a
(possibly batched) dense map with its own fan-in and fan-out, and those fans drive μP: the
initialisation std of every factor and, later, its learning-rate multiplier.

Conventions shared by all structures:

* Every factor is stored as ``(*batch, fan_out, fan_in)``, the layout of ``nn.Linear.weight``
  with optional leading batch dimensions (one dense block per batch index).
* Compute is counted in **multiply-accumulates (MACs) of the forward pass** (``layer.macs()``),
  one per fused multiply-add, the convention of fvcore and of the paper's FLOP axes.
  ``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per MAC, so its total is
  ``2 * layer.macs(batch)``. The bias addition, padding and reshapes are not counted;
  computations on zero-padded rows and columns are.
* ``factors()`` is the single source of per-factor metadata. Nothing is stored on tensors.
* Widths that do not factorise well are zero-padded to ``in_padded`` / ``out_padded``; the input
  is zero-padded on the right and the output truncated, so padding never changes the function's
  shape, only its cost.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..options import check_positive_int
from .spec import format_spec

__all__ = [
    "NORMS",
    "Factor",
    "StructuredLinear",
    "counting_macs",
    "is_counting_macs",
    "mup_init_std",
]

#: Weight normalisations accepted by the ``norm`` option of every structure.
NORMS = ("rms_clamp",)
_NORM_EPS = 1e-8
# A plain module global rather than a ContextVar: torch.compile traces (and guards on) a global
# read, but not ContextVar.get. A depth, so that nested blocks restore correctly.
_counting_depth = 0


@contextlib.contextmanager
def counting_macs():
    """Run the algorithm that ``macs()`` counts, whatever the input size, inside this block.

    A layer may pick its algorithm by input size: BTT-MoE computes every expert and masks below
    a few hundred rows, where that is faster than gathering each expert's rows. A FLOP count of
    one example (``FlopCounterMode``) would then count all experts, not the active ones that a
    training batch runs. Count inside ``with counting_macs():`` to measure the algorithm::

        with structlin.counting_macs(), FlopCounterMode(display=False) as counter:
            model(example)
    """
    global _counting_depth
    _counting_depth += 1
    try:
        yield
    finally:
        _counting_depth -= 1


def is_counting_macs() -> bool:
    """Whether the caller is inside :func:`counting_macs` (layers that choose an algorithm by
    input size ask this)."""
    return _counting_depth > 0


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
    ``Θ(sqrt(fan_out / fan_in))``, the μP target of Yang, Simon & Bernstein ("A Spectral
    Condition for Feature Learning", 2023), which Qiu et al. (ICML 2024) apply to every factor of
    a structured layer.

    Examples::

        >>> mup_init_std(256, 64)  # sqrt(64) / 256
        0.03125
    """
    return math.sqrt(min(fan_in, fan_out)) / fan_in


def _rms_ratio(f: Factor) -> torch.Tensor:
    return f.tensor.square().mean().add(_NORM_EPS).sqrt() / mup_init_std(f.fan_in, f.fan_out)


#: Stands in for ``torch.autocast(..., enabled=False)`` when autocast is off: nothing to change.
_SAME_AUTOCAST = contextlib.nullcontext()


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # device types without autocast support, e.g. "meta"
        return False


def _finishing(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a subclass ``__init__`` so that ``_finish`` runs after the outermost one returns.

    A nested ``super().__init__`` call finds that ``type(self).__init__`` is another class's
    wrapper and leaves the finishing to that one, so it runs exactly once per construction.
    """

    @functools.wraps(init)
    def __init__(self: StructuredLinear, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self).__init__ is __init__:
            self._finish()

    return __init__


class StructuredLinear(nn.Module):
    """Base class of all structured layers: ``y = x W^T + b`` with ``W`` implicit.

    **Writing a structure.** A subclass's ``__init__`` calls ``super().__init__(in_features,
    out_features, bias, **kwargs)``, sets ``in_padded`` / ``out_padded`` if it zero-pads, and
    creates its factors as ``nn.Parameter`` attributes (``self.factory_kwargs`` holds the device
    and dtype). It implements

    * ``_factor_fans() -> [(param_name, fan_in, fan_out), ...]``, one entry per factor in forward
      order; the last entry is the factor closest to the output (zeroed by ``zero_init_last``);
    * ``_reference_matmul(x, weights) -> y``, ``(N, in_padded) -> (N, out_padded)`` with plain
      torch ops, ``weights`` being the factor tensors in ``_factor_fans`` order (weight-normalised,
      and cast under autocast);
    * ``options() -> dict``, its own options merged with ``super().options()``;

    and optionally ``_fast_matmul(x, weights, bias)`` (a faster kernel that also adds ``bias``,
    which is None when the output is truncated), ``_macs_per_example()`` (defaults to the
    factors' element count, right whenever no weight is shared) and ``_from_dense_padded(W)``.

    There is no finishing step to remember: when the outermost ``__init__`` returns, the base
    class checks every factor against ``_factor_fans``, creates the gains of ``norm`` and calls
    :meth:`reset_parameters`, exactly once. Decorate the class with
    :func:`structlin.register_structure` to build it by name with ``make_linear``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias (initialised to zero, as μP prescribes).
        norm: ``None`` or ``"rms_clamp"``: weight normalisation of every factor (Qiu et al., ICML
            2024, §5). Each factor ``W_t`` is used as ``gamma_t * W_t / max(1, rms(W_t) /
            sigma_t)`` with ``sigma_t`` its μP init std: a factor's RMS may shrink freely but never
            exceed its init value. The stored parameter is unchanged; the clamp lives in the
            forward graph. Costs ``O(params)`` per forward, independent of the batch, so MACs are
            unchanged.
        learn_gamma: with ``norm``, learn one scalar gain ``gamma_t`` per factor (init 1,
            parameters ``gammas.t``). Use False for Q/K projections under QK-LayerNorm, where the
            scale is irrelevant.
        device, dtype: factory kwargs for the parameters, as in ``nn.Linear``.

    Shape:
        - Input: ``(*, H_in)`` where ``*`` means any number of dimensions (none included) and
          ``H_in = in_features``.
        - Output: ``(*, H_out)`` where all but the last dimension are the same shape as the input
          and ``H_out = out_features``.

    Examples::

        >>> class TwoFactor(StructuredLinear):  # W = B A, A: (r, d_in), B: (d_out, r)
        ...     def __init__(self, in_features, out_features, bias=True, *, rank=2, **kwargs):
        ...         super().__init__(in_features, out_features, bias, **kwargs)
        ...         self.rank = rank
        ...         self.A = nn.Parameter(torch.empty(rank, in_features, **self.factory_kwargs))
        ...         self.B = nn.Parameter(torch.empty(out_features, rank, **self.factory_kwargs))
        ...     def _factor_fans(self):
        ...         return [("A", self.in_features, self.rank), ("B", self.rank, self.out_features)]
        ...     def _reference_matmul(self, x, weights):
        ...         return x @ weights[0].T @ weights[1].T
        ...     def options(self):
        ...         return {"rank": self.rank, **super().options()}
        >>> layer = TwoFactor(64, 32, rank=4)
        >>> layer(torch.randn(10, 64)).shape, layer.macs(), layer.options()
        (torch.Size([10, 32]), 384, {'rank': 4})
        >>> [(f.name, f.fan_in, f.fan_out) for f in layer.factors()]
        [('A', 64, 4), ('B', 4, 32)]
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
        #: Device and dtype for the factors a subclass creates; removed once construction ends.
        self.factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _finishing(cls.__dict__["__init__"])

    def _finish(self) -> None:
        """Check the factors, create the norm gains, initialise. Runs once, after ``__init__``."""
        cls = type(self)
        for method in ("_factor_fans", "_reference_matmul"):
            if getattr(cls, method) is getattr(StructuredLinear, method):
                raise TypeError(f"{cls.__name__} must implement {method}() (see StructuredLinear)")
        # Fans are fixed once the factors exist; plain Python data, cached to keep forward lean.
        self._fans = tuple(self._factor_fans())
        self._paths = tuple(tuple(name.split(".")) for name, _, _ in self._fans)
        for name, fan_in, fan_out in self._fans:
            t = self.get_parameter(name)  # AttributeError names a factor that does not exist
            if t.dim() < 2 or tuple(t.shape[-2:]) != (fan_out, fan_in):
                raise TypeError(
                    f"{cls.__name__}: factor {name!r} has shape {tuple(t.shape)}, but "
                    f"_factor_fans() gives fan_out x fan_in = {fan_out} x {fan_in}; factors are "
                    f"stored as (*batch, fan_out, fan_in)"
                )
        factory = self.__dict__.pop("factory_kwargs")
        if self.norm is not None and self.learn_gamma:
            self.gammas = nn.ParameterList(
                nn.Parameter(torch.ones((), **factory)) for _ in self._fans
            )
        else:
            self.gammas = None
        self.reset_parameters()

    # ------------------------------------------------------------------ to implement
    def _factor_fans(self) -> list[tuple[str, int, int]]:
        """``[(param_name, fan_in, fan_out), ...]`` of the factors, in forward order."""
        raise NotImplementedError

    def _reference_matmul(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """``(N, in_padded) -> (N, out_padded)`` with plain torch ops (no bias)."""
        raise NotImplementedError

    def _fast_matmul(
        self, x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``_reference_matmul(x, weights) + bias`` by the fastest kernel the structure has.

        ``bias`` is None when the output is truncated (the bias is then added after truncation).
        Default: the reference path, then the bias."""
        y = self._reference_matmul(x, weights)
        return y if bias is None else y + bias

    def _macs_per_example(self) -> int:
        return sum(f.tensor.numel() for f in self.factors())

    def _from_dense_padded(self, weight: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement from_dense")

    def options(self) -> dict[str, Any]:
        """The options that rebuild an equal layer (same structure, factor shapes and norm).

        ``make_linear(self.structure, in_features, out_features, bias=..., **self.options())``
        builds a layer with the same factor shapes. Each structure returns its own options
        followed by these common ones: ``norm`` when set, ``learn_gamma`` when False.
        """
        opts: dict[str, Any] = {}
        if self.norm is not None:
            opts["norm"] = self.norm
        if not self.learn_gamma:
            opts["learn_gamma"] = False
        return opts

    @property
    def spec(self) -> str:
        """The spec string of this layer: ``parse_spec(layer.spec) == (layer.structure,
        layer.options())`` and ``make_linear(layer.spec, d_in, d_out, bias=...)`` rebuilds it."""
        if not self.structure:
            raise ValueError(
                f"{type(self).__name__} is not registered (see register_structure), so it has "
                f"no spec; build it from its class and options() instead"
            )
        return format_spec(self.structure, self.options())

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

    def _forward_weights(self) -> list[torch.Tensor]:
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
    def _input_error(self, x: Any) -> ValueError:
        """The error for an input ``forward`` refuses (checked inline there, to keep it lean)."""
        if not isinstance(x, torch.Tensor):
            return ValueError(f"{self._name()}: expected a torch.Tensor input, got {type(x)}")
        if not x.is_floating_point():
            return ValueError(
                f"{self._name()}: expected a floating-point input, got dtype {x.dtype}; "
                f"convert it first, e.g. x.float()"
            )
        return ValueError(
            f"{self._name()}: expected input of shape (..., {self.in_features}), "
            f"got {tuple(x.shape)}"
        )

    def _dtype_error(self, got: torch.dtype, want: torch.dtype) -> TypeError:
        short = str(want).removeprefix("torch.")
        return TypeError(
            f"{self._name()}: the input is {got} but the layer's parameters are {want}; convert "
            f"the input (x.to(torch.{short}), e.g. x.float()), build the layer with "
            f"dtype={got}, or move it with layer.to({got})"
        )

    def _name(self) -> str:
        cls = type(self).__name__
        return f"{cls}(in_features={self.in_features}, out_features={self.out_features})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x W^T + b`` for ``x`` of shape ``(*, in_features)``; ``W`` is never formed."""
        return self._forward(x, reference=False)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward` through ``_reference_matmul``, the plain matmul path (for
        tests, and for MAC counting with ``FlopCounterMode``, which must see every product)."""
        return self._forward(x, reference=True)

    def _forward(self, x: torch.Tensor, reference: bool) -> torch.Tensor:
        """The whole forward pass: cast, flatten to ``(N, in_features)``, zero-pad, matmul,
        truncate, add the bias, restore the leading dimensions."""
        ok = isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > 0
        if not (ok and x.shape[-1] == self.in_features):
            raise self._input_error(x)
        weights, bias = self._forward_weights(), self.bias
        device = x.device.type
        autocast = _autocast_enabled(device)
        if autocast:
            # Cast like nn.Linear does under autocast, then run the kernels with autocast off so a
            # custom backward sees the same dtypes as its forward.
            dtype = torch.get_autocast_dtype(device)
            x, weights = x.to(dtype), [w.to(dtype) for w in weights]
            bias = bias.to(dtype) if bias is not None else None
        elif x.dtype != weights[0].dtype:  # a cheap comparison; the kernels' own error is opaque
            raise self._dtype_error(x.dtype, weights[0].dtype)
        lead = x.shape[:-1]
        flat = x.dim() != 2  # 2-D inputs skip the reshapes (and their autograd nodes)
        if flat:
            x = x.reshape(math.prod(lead), self.in_features)
        if self.in_padded != self.in_features:
            x = F.pad(x, (0, self.in_padded - self.in_features))
        truncate = self.out_padded != self.out_features
        with torch.autocast(device, enabled=False) if autocast else _SAME_AUTOCAST:
            if reference:
                y = self._reference_matmul(x, weights)
            else:  # the bias is fused into the fast kernel unless the output is truncated
                y = self._fast_matmul(x, weights, None if truncate else bias)
                bias = bias if truncate else None
            if truncate:
                y = y[:, : self.out_features]
            if bias is not None:
                y = y + bias
        return y.reshape(*lead, self.out_features) if flat else y

    # ------------------------------------------------------------------ dense conversion
    def to_dense(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` matrix ``W`` this layer represents."""
        return self._dense_padded()[: self.out_features, : self.in_features]

    def _dense_padded(self) -> torch.Tensor:
        weights = self._forward_weights()
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
        self._check_from_dense(weight, bias)
        ref = self._forward_weights()[0]
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

    def _check_from_dense(self, weight: Any, bias: torch.Tensor | None) -> None:
        """The errors of :meth:`from_dense`: shapes, a bias the layer lacks, non-finite values."""
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
        if not weight.is_meta and not bool(torch.isfinite(weight).all()):
            bad = int((~torch.isfinite(weight)).sum())
            raise ValueError(
                f"{self._name()}.from_dense: the weight has {bad} non-finite value(s) (NaN or "
                f"inf), which no projection can fit; find where they come from (a diverged run, "
                f"an uninitialised tensor) or replace them first, e.g. "
                f"torch.nan_to_num(weight, nan=0.0, posinf=0.0, neginf=0.0)"
            )

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

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # Before 0.1's layer contract the core tensors were named ``cores.N``; renaming them here
        # lets those state dicts and training checkpoints load (same shapes, same layout).
        if isinstance(getattr(self, "weights", None), nn.ParameterList):
            old = prefix + "cores."
            for key in [k for k in state_dict if k.startswith(old)]:
                new_key = prefix + "weights." + key[len(old) :]
                if new_key not in state_dict:
                    state_dict[new_key] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        parts.append(f"bias={self.bias is not None}")
        parts += [f"{key}={value!r}" for key, value in self.options().items()]
        if (self.in_padded, self.out_padded) != (self.in_features, self.out_features):
            parts.append(f"padded=({self.in_padded}, {self.out_padded})")
        shapes = ", ".join(f"{f.name}{tuple(f.tensor.shape)}" for f in self.factors())
        parts.append(f"factors=[{shapes}]")
        parts.append(f"params={self.num_params / self.dense_params:.3g}x dense")
        parts.append(f"macs={self.macs() / self.dense_macs:.3g}x dense")
        return ", ".join(parts)
