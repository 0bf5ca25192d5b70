"""Block Tensor-Train matrix products, batch-last, with a hand-written backward for 2 cores.

Notation (see :class:`structlin.layers.BTTLinear`): a 2-core BTT maps ``x`` viewed as
``(N, m1, m0)`` to ``y`` viewed as ``(N, n0, n1)`` through

* core 0, ``w0`` of shape ``(m1, n0*r, m0)``: block ``i1`` maps ``m0 -> (n0, r)``;
* core 1, ``w1`` of shape ``(n0, n1, r*m1)``: block ``j0`` maps ``(r, m1) -> n1``.

Why batch-last: the two stages are joined by a permutation of the intermediate (the Monarch
"transpose"). With the batch index ``N`` innermost that permutation moves contiguous runs of
``N`` values, which costs about as much as a memcpy; with ``N`` outermost it is an element-wise
gather, which on CPUs cost more than both matmuls together in our measurements
(benchmarks/RESULTS.md). The input and output stay in the caller's ``(N, d)`` layout: the input
is read through a strided view, and the last matmul is computed with ``N`` as its row index so
the final reordering moves contiguous rows of ``n1`` values.

All products are ``torch.bmm`` calls rather than ``torch.matmul``, which adds expand/reshape
dispatches per call that are measurable at small widths.

The backward saves only ``x``, the two cores and the permuted intermediate (``N * n0 * r * m1``
values), never the dense matrix, and skips the input gradient when it is not needed. It is itself
differentiable (for double backward it recomputes the intermediate with a graph).

On the CPU in float32, :func:`btt2_matmul` runs the fused C kernel of :mod:`.cpu_jit` instead when
it can be built: same math, no layout copies, about 1.3x faster at ``d=1024``, rank 1
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch

from .cpu_jit import kernel_for

__all__ = ["btt2_matmul", "btt_chain_matmul"]


def _stage1(x: torch.Tensor, w0: torch.Tensor, n0: int, r: int) -> torch.Tensor:
    """``(N, m1*m0) -> (n0, r*m1, N)``: block-diagonal core 0, then the inter-core permutation."""
    m1, _, m0 = w0.shape
    batch = x.shape[0]
    xt = x.reshape(batch, m1, m0).permute(1, 2, 0)  # (m1, m0, N), strided view when possible
    z = torch.bmm(w0, xt)  # (m1, n0*r, N)
    # contiguous(): for r = 1 the reshape is a view whose matrices have no unit-stride row, which
    # sends the next bmm down a slow path; an explicit copy of contiguous runs is cheaper.
    return z.view(m1, n0, r, batch).permute(1, 2, 0, 3).reshape(n0, r * m1, batch).contiguous()


def _batch_first(y: torch.Tensor, bias: torch.Tensor | None, fused: bool = True) -> torch.Tensor:
    """``(P, N, n) -> (N, P*n)``, adding ``bias`` in the same pass when ``fused``.

    The fused form writes through ``out=``, which autograd cannot differentiate: use it only
    inside an ``autograd.Function``.
    """
    p, batch, n = y.shape
    if bias is None:
        return y.transpose(0, 1).reshape(batch, p * n)
    if not fused or torch.compiler.is_compiling():
        # out= does not trace well; the compiler fuses the add and the copy by itself.
        return (y.transpose(0, 1) + bias.view(p, n)).reshape(batch, p * n)
    out = torch.empty(batch, p * n, dtype=y.dtype, device=y.device)
    torch.add(y.transpose(0, 1), bias.view(p, n), out=out.view(batch, p, n))
    return out


class _BTT2(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.kernel = kernel_for(x, w0, w1, bias)
        if ctx.kernel is not None:
            x = x.contiguous()
            y, z = ctx.kernel.forward(x, w0, w1, bias)
            ctx.save_for_backward(x, w0, w1, z)
            return y
        n0 = w1.shape[0]
        r = w0.shape[1] // n0
        zp = _stage1(x, w0, n0, r)  # (n0, r*m1, N)
        y = torch.bmm(zp.mT, w1.mT)  # (n0, N, n1)
        ctx.save_for_backward(x, w0, w1, zp)
        return _batch_first(y, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w0, w1, zp = ctx.saved_tensors
        m1, h, m0 = w0.shape
        n0, n1, _ = w1.shape
        r = h // n0
        batch = x.shape[0]
        if ctx.kernel is not None and not torch.is_grad_enabled() and grad.dtype == x.dtype:
            dx, dw0, dw1, db = ctx.kernel.backward(
                x, w0, w1, zp, grad.contiguous(), ctx.needs_input_grad[0], ctx.needs_input_grad[3]
            )
            return dx, dw0, dw1, db
        if torch.is_grad_enabled() or ctx.kernel is not None:
            # Double backward (create_graph=True): the saved intermediate has no graph back to
            # x and w0, so recompute it; every op below is then differentiable. (After the C
            # forward the saved tensor is the C kernel's layout, so it is recomputed too.)
            zp = _stage1(x, w0, n0, r)
        gb = grad.reshape(batch, n0, n1).transpose(0, 1)  # (n0, N, n1), strided view
        dw1 = None
        if ctx.needs_input_grad[2]:
            # (K, N) @ (N, n1) with both operands row-major ran ~1.4x faster in MKL than the
            # transposed product; the transpose of the small result is cheap.
            dw1 = torch.bmm(zp, gb).mT.contiguous()
        dx = dw0 = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dzp = torch.bmm(w1.mT, gb.mT)  # (n0, r*m1, N)
            dz = dzp.view(n0, r, m1, batch).permute(2, 0, 1, 3).reshape(m1, h, batch).contiguous()
            if ctx.needs_input_grad[1]:
                dw0 = torch.bmm(dz, x.reshape(batch, m1, m0).transpose(0, 1))
            if ctx.needs_input_grad[0]:
                dx = torch.bmm(dz.mT, w0).transpose(0, 1).reshape(batch, m1 * m0)
        db = grad.sum(0) if ctx.needs_input_grad[3] else None
        return dx, dw0, dw1, db


def btt2_matmul(
    x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """2-core BTT product ``(N, m1*m0) -> (N, n0*n1)`` (plus ``bias``), hand-written backward.

    ``w0``: ``(m1, n0*r, m0)``; ``w1``: ``(n0, n1, r*m1)``; ``bias``: ``(n0*n1,)`` or None. All
    must share one dtype.
    """
    return _BTT2.apply(x, w0, w1, bias)


def btt_chain_matmul(
    x: torch.Tensor,
    cores: list[torch.Tensor],
    in_fast_first: tuple[int, ...],
    out_factors: tuple[int, ...],
    ranks: tuple[int, ...],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """General ``c``-core BTT product in the batch-last layout (autograd backward).

    Core ``t`` has shape ``(P_t * Q_t, n_t r_{t+1}, r_t m_t)`` with ``P_t = prod_{s<t} n_s``
    (outputs already produced) and ``Q_t = prod_{s>t} m_s`` (inputs not yet contracted);
    ``in_fast_first[t] = m_t`` is the input factor contracted at step ``t`` (fastest first).
    """
    ms, ns, rs = in_fast_first, out_factors, ranks
    c = len(cores)
    batch = x.shape[0]
    q0 = x.shape[1] // ms[0]
    s = x.reshape(batch, q0, ms[0]).permute(1, 2, 0)  # (Q_0, m_0, N)
    p = 1
    for t in range(c - 1):
        q = s.shape[0] // p
        z = torch.matmul(cores[t], s)  # (P*Q, n_t r_{t+1}, N)
        q_next = q // ms[t + 1]
        z = z.view(p, q_next, ms[t + 1], ns[t], rs[t + 1], batch).permute(0, 3, 1, 4, 2, 5)
        p *= ns[t]
        s = z.reshape(p * q_next, rs[t + 1] * ms[t + 1], batch)
    y = torch.matmul(s.mT, cores[-1].mT)  # (P, N, n_{c-1})
    return _batch_first(y, bias, fused=False)
