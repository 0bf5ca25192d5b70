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
differentiable (for double backward it recomputes the intermediate with a graph). The 2-core
product is the custom op ``structlin::btt2`` of :mod:`.ops`, where the batch-last path lives.

On the CPU in float32, :func:`btt2_matmul` runs the fused C kernel of :mod:`.cpu_jit` instead when
it can be built: same math, no layout copies, about 1.3x faster at ``d=1024``, rank 1
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch

from .ops import batch_first, btt2

__all__ = ["btt2_matmul", "btt_chain_matmul"]


def btt2_matmul(
    x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """2-core BTT product ``(N, m1*m0) -> (N, n0*n1)`` (plus ``bias``), hand-written backward.

    ``w0``: ``(m1, n0*r, m0)``; ``w1``: ``(n0, n1, r*m1)``; ``bias``: ``(n0*n1,)`` or None. All
    must share one dtype. Runs the ``structlin::btt2`` custom op (:mod:`.ops`), so
    ``torch.func``, ``torch.compile(fullgraph=True)`` and ``FlopCounterMode`` see one op.
    """
    return btt2(x, w0, w1, bias)


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
    return batch_first(y, bias, fused=False)
