"""2-core BTT (and Monarch) product in Triton, forward and backward, for CUDA tensors.

Same math and layouts as :func:`structlin.kernels.btt.btt2_matmul`: ``x`` ``(N, m1*m0)``,
``w0`` ``(m1, n0*r, m0)``, ``w1`` ``(n0, n1, r*m1)``, ``bias`` ``(n0*n1,)`` or None, ``y``
``(N, n0*n1)``. A Monarch layer (:class:`structlin.layers.MonarchLinear`) is this product with
``r = h / b``, with the same parameter layout, so it runs on these functions unchanged.

* Forward, fused (:func:`.triton_kernels.btt2_fused_kernel`) when the rank is at most 16 and the
  blocks ``m0, n1`` at most 256: one kernel, the intermediate never written to memory. MACs per
  row: ``r (d_in n0 + d_out m1)`` plus the rank padding to 16 on the tensor cores. Otherwise
  (Monarch, large ranks) two launches of the strided batched matmul, the first writing the
  intermediate ``(n0, N, r*m1)`` directly in the layout the second reads; no copy kernels.
* Backward, fused under the same limits: two kernels
  (:func:`.triton_kernels.btt2_grad_w_kernel` for ``dw0``, ``dw1`` and the bias gradient,
  :func:`.triton_kernels.btt2_grad_x_kernel` for ``dx``), each recomputing on chip the slices of
  the intermediate ``z`` and of ``dz`` it needs, neither writing them to memory. MACs per row:
  ``r (d_in n0 + d_out m1)`` twice in the first (``z``, ``dz``; then ``dw1``, ``dw0``) and twice
  in the second (``dz``, ``dx``), against three times in the five-launch path, which pays for
  it in writes and reads of the ``N r`` ``(n0 + m1)``-sized intermediates. Otherwise five
  launches of the strided batched matmul (recompute the intermediate, ``dz``, ``dw1``, ``dw0``,
  ``dx``), every layout permutation folded into strides, plus ``grad.sum(0)`` for the bias.
  Neither is itself differentiable (no double backward through this path).

bfloat16/float16 inputs use the tensor cores with float32 accumulation; float32 inputs use TF32
only when ``torch.backends.cuda.matmul.allow_tf32`` is on, as ``torch.matmul`` does.

Without a GPU the kernels run in Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1``
is set before this module first launches a kernel (Triton reads it when the kernels are
defined); :func:`triton_available` says whether a device can run them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

import torch

__all__ = [
    "btt2_triton",
    "btt2_triton_backward",
    "btt2_triton_forward",
    "fused_fits",
    "triton_available",
]

FUSED_MAX_RANK = 16
FUSED_MAX_BLOCK = 256


def _kernels() -> ModuleType:
    from . import triton_kernels  # imports triton: only on first use

    return triton_kernels


def triton_available(device: torch.device | str) -> bool:
    """Whether these kernels can run on ``device``: Triton is installed and ``device`` is CUDA
    (with a GPU present), or it is the CPU and Triton's interpreter is on."""
    if importlib.util.find_spec("triton") is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type != "cpu":
        return False
    module = sys.modules.get(f"{__package__}.triton_kernels")
    if module is not None:  # the kernels were defined already: their mode is fixed
        return bool(module.INTERPRET)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _dims(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor) -> tuple[int, ...]:
    """``(N, m1, m0, n0, n1, r)``, after checking that the shapes fit together."""
    m1, h, m0 = w0.shape
    n0, n1, k = w1.shape
    r = h // n0
    if x.dim() != 2 or x.shape[1] != m1 * m0 or h != n0 * r or k != r * m1:
        raise ValueError(
            f"btt2_triton: shapes x {tuple(x.shape)}, w0 {tuple(w0.shape)}, w1 {tuple(w1.shape)} "
            "do not fit x (N, m1*m0), w0 (m1, n0*r, m0), w1 (n0, n1, r*m1)"
        )
    if not x.dtype == w0.dtype == w1.dtype:
        raise ValueError(f"btt2_triton: dtypes differ: {x.dtype}, {w0.dtype}, {w1.dtype}")
    return x.shape[0], m1, m0, n0, n1, r


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs, which always use the tensor cores


def _bmm(
    a: tuple[torch.Tensor, Sequence[int]],
    b: tuple[torch.Tensor, Sequence[int]],
    c: tuple[torch.Tensor, Sequence[int]],
    sizes: tuple[int, int, int, int],
    split: int = 1,
    bias: torch.Tensor | None = None,
) -> None:
    """``C[b, m, col(n)] = sum_k A[b, m, k] B[b, k, n] (+ bias[b*N + n])`` for
    ``sizes = (batch, M, N, K)``; each operand is a tensor with its strides ``(batch, row,
    column)``, and ``C``'s column strides are ``(hi, lo)`` for ``col = (n // split, n % split)``.
    """
    kern = _kernels()
    batch, m, n, k = sizes
    (at, sa), (bt, sb), (ct, sc) = a, b, c

    def grid(meta: dict) -> tuple[int, int]:
        return _cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]), batch

    kern.bmm_kernel[grid](
        at, bt, ct, bias if bias is not None else ct, m, n, k,
        *sa, *sb, *sc, split, n,
        HAS_BIAS=bias is not None, PRECISION=_precision(at.dtype),
    )  # fmt: skip


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _stage1(x: torch.Tensor, w0: torch.Tensor, n0: int, r: int) -> torch.Tensor:
    """The intermediate ``zp[j0, n, (rho, i1)] = sum_i0 w0[i1, (j0, rho), i0] x[n, i1, i0]``,
    ``(n0, N, r*m1)``, written straight into that layout (the split column ``(j0, rho)``)."""
    rows = x.shape[0]
    m1, h, m0 = w0.shape
    zp = torch.empty(n0, rows, r * m1, dtype=x.dtype, device=x.device)
    sx = (m0 * x.stride(1), x.stride(0), x.stride(1))
    sw = (w0.stride(0), w0.stride(2), w0.stride(1))
    sz = (zp.stride(2), zp.stride(1), zp.stride(0), m1 * zp.stride(2))
    _bmm((x, sx), (w0, sw), (zp, sz), (m1, rows, h, m0), split=r)
    return zp


def _stage2(zp: torch.Tensor, w1: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y[n, (j0, j1)] = sum_k zp[j0, n, k] w1[j0, j1, k] (+ bias)``, ``(N, n0*n1)``."""
    n0, rows, k = zp.shape
    n1 = w1.shape[1]
    y = torch.empty(rows, n0 * n1, dtype=zp.dtype, device=zp.device)
    sw = (w1.stride(0), w1.stride(2), w1.stride(1))
    sy = (n1 * y.stride(1), y.stride(0), y.stride(1), 0)
    _bmm((zp, zp.stride()), (w1, sw), (y, sy), (n0, rows, n1, k), bias=bias)
    return y


def fused_fits(w0: torch.Tensor, w1: torch.Tensor) -> bool:
    """Whether the one-kernel forward applies: rank <= 16 and blocks ``m0, n1 <= 256``."""
    m0, n0, n1 = w0.shape[2], w1.shape[0], w1.shape[1]
    r = w0.shape[1] // n0
    return r <= FUSED_MAX_RANK and max(m0, n1) <= FUSED_MAX_BLOCK


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _fused_forward(
    x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    rows, m1, m0, n0, n1, r = _dims(x, w0, w1)
    y = torch.empty(rows, n0 * n1, dtype=x.dtype, device=x.device)

    def grid(meta: dict) -> tuple[int, int]:
        return n0, _cdiv(rows, meta["BLOCK_N"])

    _kernels().btt2_fused_kernel[grid](
        x, w0, w1, bias if bias is not None else y, y, rows, m1, m0, n1, r,
        *x.stride(), *w0.stride(), *w1.stride(), *y.stride(),
        HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype),
        RP=_pow2(r), M0P=_pow2(m0), N1P=_pow2(n1),
    )  # fmt: skip
    return y


def btt2_triton_forward(
    x: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    fused: bool | None = None,
) -> torch.Tensor:
    """``y = BTT(x) + bias``, ``(N, m1*m0) -> (N, n0*n1)``, without autograd.

    ``fused``: force the one-kernel (True) or the two-kernel (False) forward; by default the
    fused one whenever :func:`fused_fits`.
    """
    _, _, _, n0, _, r = _dims(x, w0, w1)
    if bias is not None and bias.shape != (w1.shape[0] * w1.shape[1],):
        raise ValueError(
            f"btt2_triton: bias shape {tuple(bias.shape)}, expected ({w1.shape[0] * w1.shape[1]},)"
        )
    bias = bias.contiguous() if bias is not None else None
    if fused is None:
        fused = fused_fits(w0, w1)
    if fused:
        if not fused_fits(w0, w1):
            raise ValueError(
                f"btt2_triton: the fused forward needs rank <= {FUSED_MAX_RANK} and blocks "
                f"m0, n1 <= {FUSED_MAX_BLOCK}; got r={r}, w0 {tuple(w0.shape)}, "
                f"w1 {tuple(w1.shape)}"
            )
        return _fused_forward(x, w0, w1, bias)
    return _stage2(_stage1(x, w0, n0, r), w1, bias)


def _grad_z(grad: torch.Tensor, w1: torch.Tensor, m1: int, r: int) -> torch.Tensor:
    """``dz[i1, n, (j0, rho)] = sum_j1 grad[n, (j0, j1)] w1[j0, j1, (rho, i1)]``, ``(m1, N, h)``,
    written straight into that layout (the split column ``(rho, i1)``)."""
    n0, n1, k = w1.shape
    rows = grad.shape[0]
    dz = torch.empty(m1, rows, n0 * r, dtype=grad.dtype, device=grad.device)
    sg = (n1 * grad.stride(1), grad.stride(0), grad.stride(1))
    sd = (r * dz.stride(2), dz.stride(1), dz.stride(2), dz.stride(0))
    _bmm((grad, sg), (w1, w1.stride()), (dz, sd), (n0, rows, k, n1), split=m1)
    return dz


def btt2_triton_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor,
    needs: Sequence[bool] = (True, True, True, True),
    zp: torch.Tensor | None = None,
    *,
    fused: bool | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx, dw0, dw1, dbias)`` of ``y = BTT(x) + bias`` for ``grad = dL/dy``.

    ``needs``: which of the four to compute (the others are None). With ``dz = dL/dz``
    ``(m1, N, h)``: ``dw1 = grad^T zp`` per ``j0``, ``dz = grad w1`` per ``j0``, ``dw0 = dz^T x``
    and ``dx = dz w0`` per ``i1``. ``fused``: force the two-kernel backward that keeps ``z`` and
    ``dz`` on chip (True) or the five-launch one (False); by default the former whenever
    :func:`fused_fits`. ``zp``: the intermediate ``(n0, N, r*m1)`` if the caller kept it, used by
    the five-launch path only (which recomputes it otherwise, ``N d_in n0 r`` MACs).
    """
    rows, _, _, n0, n1, r = _dims(x, w0, w1)
    if grad.shape != (rows, n0 * n1) or grad.dtype != x.dtype:
        raise ValueError(
            f"btt2_triton: grad {tuple(grad.shape)} {grad.dtype}, expected "
            f"({rows}, {n0 * n1}) {x.dtype}"
        )
    if fused is None:
        fused = fused_fits(w0, w1)
    if not fused:
        return _unfused_backward(grad, x, w0, w1, needs, zp)
    if not fused_fits(w0, w1):
        raise ValueError(
            f"btt2_triton: the fused backward needs rank <= {FUSED_MAX_RANK} and blocks "
            f"m0, n1 <= {FUSED_MAX_BLOCK}; got r={r}, w0 {tuple(w0.shape)}, w1 {tuple(w1.shape)}"
        )
    return _fused_backward(grad, x, w0, w1, needs)


def _fused_backward(
    grad: torch.Tensor, x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, needs: Sequence[bool]
) -> tuple[torch.Tensor | None, ...]:
    rows, m1, m0, n0, n1, r = _dims(x, w0, w1)
    need_x, need_w0, need_w1, need_b = needs
    kern, precision = _kernels(), _precision(x.dtype)
    pads = {"RP": _pow2(r), "M0P": _pow2(m0), "N1P": _pow2(n1)}
    dx = dw0 = dw1 = db = None
    if need_w0 or need_w1:  # the bias gradient comes with them, from the same loads of grad
        dw0 = torch.empty(w0.shape, dtype=x.dtype, device=x.device) if need_w0 else None
        dw1 = torch.empty(w1.shape, dtype=x.dtype, device=x.device) if need_w1 else None
        db = torch.empty(n0 * n1, dtype=x.dtype, device=x.device) if need_b else None
        kern.btt2_grad_w_kernel[(m1 * n0,)](
            x, w0, w1, grad, _or(dw0, grad), _or(dw1, grad), _or(db, grad), rows, m1, m0, n0, n1, r,
            *x.stride(), *w0.stride(), *w1.stride(), *grad.stride(),
            NEED_W0=bool(need_w0), NEED_W1=bool(need_w1), NEED_B=bool(need_b),
            PRECISION=precision, **pads,
        )  # fmt: skip
    elif need_b:
        db = grad.sum(0)
    if need_x:
        dx = torch.empty(rows, m1 * m0, dtype=x.dtype, device=x.device)

        def grid(meta: dict) -> tuple[int, int]:
            return m1, _cdiv(rows, meta["BLOCK_N"])

        kern.btt2_grad_x_kernel[grid](
            grad, w0, w1, dx, rows, m1, m0, n0, n1, r,
            *grad.stride(), *w0.stride(), *w1.stride(), *dx.stride(),
            PRECISION=precision, **pads,
        )  # fmt: skip
    return dx, dw0, dw1, db


def _or(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """``t``, or a tensor to pass for a pointer the kernel never touches."""
    return t if t is not None else placeholder


def _unfused_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor,
    needs: Sequence[bool],
    zp: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    rows, m1, m0, n0, n1, r = _dims(x, w0, w1)
    need_x, need_w0, need_w1, need_b = needs
    dx = dw0 = dw1 = None
    if need_w1:
        zp = _stage1(x, w0, n0, r) if zp is None else zp
        dw1 = torch.empty_like(w1, memory_format=torch.contiguous_format)
        sg = (n1 * grad.stride(1), grad.stride(1), grad.stride(0))  # A[j0, j1, n]
        sd = (dw1.stride(0), dw1.stride(1), dw1.stride(2), 0)
        _bmm((grad, sg), (zp, zp.stride()), (dw1, sd), (n0, n1, r * m1, rows))
    if need_x or need_w0:
        dz = _grad_z(grad, w1, m1, r)
        sx = (m0 * x.stride(1), x.stride(0), x.stride(1))  # x as [i1, n, i0]
        if need_w0:
            dw0 = torch.empty_like(w0, memory_format=torch.contiguous_format)
            sz = (dz.stride(0), dz.stride(2), dz.stride(1))  # A[i1, h, n]
            sd = (dw0.stride(0), dw0.stride(1), dw0.stride(2), 0)
            _bmm((dz, sz), (x, sx), (dw0, sd), (m1, n0 * r, m0, rows))
        if need_x:
            dx = torch.empty(rows, m1 * m0, dtype=x.dtype, device=x.device)
            sd = (m0, m1 * m0, 1, 0)
            _bmm((dz, dz.stride()), (w0, w0.stride()), (dx, sd), (m1, rows, m0, n0 * r))
    db = grad.sum(0) if need_b else None
    return dx, dw0, dw1, db


class _BTT2Triton(torch.autograd.Function):
    @staticmethod
    def forward(
        x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return btt2_triton_forward(x, w0, w1, bias)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        x, w0, w1, _ = inputs
        ctx.save_for_backward(x, w0, w1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w0, w1 = ctx.saved_tensors
        return btt2_triton_backward(grad, x, w0, w1, ctx.needs_input_grad)


def btt2_triton(
    x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """2-core BTT product ``(N, m1*m0) -> (N, n0*n1)`` (plus ``bias``) with Triton kernels,
    differentiable once: the same function as :func:`structlin.kernels.btt.btt2_matmul`.

    ``w0``: ``(m1, n0*r, m0)``; ``w1``: ``(n0, n1, r*m1)``; ``bias``: ``(n0*n1,)`` or None; all
    of one dtype, on a device where :func:`triton_available` holds. The backward recomputes the
    intermediate rather than keeping ``N r d``-sized activations alive.
    """
    return _BTT2Triton.apply(x, w0, w1, bias)
