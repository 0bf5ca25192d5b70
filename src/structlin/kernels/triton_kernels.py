"""Triton kernels of the 2-core BTT product (imported only when Triton is installed).

Index names follow :mod:`.btt`: ``x[n, i1, i0]`` (``N x m1*m0``), ``w0[i1, (j0, rho), i0]``,
``w1[j0, j1, (rho, i1)]``, ``y[n, j0, j1]`` (``N x n0*n1``), rank ``r``.

Two kernels:

* :func:`bmm_kernel`, a batched matmul whose three operands are addressed through strides, the
  output's column index optionally split in two (``col // split``, ``col % split``) with a stride
  each. Every stage of the forward and the backward is one launch of it, with the BTT layout
  permutations folded into these strides: nothing is ever copied into another layout.
* :func:`btt2_fused_kernel`, the forward with both stages in one kernel: one program owns a row
  tile of ``x`` and one output block ``j0``; for each ``i1`` it computes the tile's slice
  ``z[:, i1, j0, :]`` (``BLOCK_N x r``, padded to 16 columns for the tensor cores) and
  contracts it at once into the ``BLOCK_N x n1`` output accumulator, so the intermediate never
  leaves the chip. Used for ranks up to 16 and block widths ``m0, n1`` up to 256.

Both accumulate in float32 and store in the output's dtype (bfloat16, float16 or float32).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

INTERPRET = bool(knobs.runtime.interpret)

# One small config under the interpreter keeps the CPU tests fast; on GPUs (H100/H200) the
# usual tensor-core tiles, with 3-4 pipeline stages.
if INTERPRET:
    BMM_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})]
    FUSED_CONFIGS = [triton.Config({"BLOCK_N": 32})]
else:
    BMM_CONFIGS = [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s
        )
        for bm, bn, bk, w, s in [
            (128, 128, 32, 8, 3),
            (128, 64, 32, 4, 4),
            (64, 128, 32, 4, 4),
            (64, 64, 32, 4, 4),
            (128, 32, 32, 4, 4),
            (64, 32, 64, 4, 3),
            (32, 32, 64, 4, 3),
        ]
    ]
    FUSED_CONFIGS = [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in [(32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 2), (128, 4, 3)]
    ]


@triton.autotune(configs=BMM_CONFIGS, key=["M", "N", "K", "HAS_BIAS"])
@triton.jit
def bmm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K,
    s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_c_hi, s_c_lo, split, s_biasb,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``C[b, m, col(n)] = sum_k A[b, m, k] B[b, k, n] (+ bias[b, n])`` for batch ``b`` (axis 1).

    ``col(n)`` is ``(n // split) * s_c_hi + (n % split) * s_c_lo``: a split column index lets a
    stage write straight into the next stage's layout. Tiles are ordered in groups of
    ``GROUP_M`` row tiles so that consecutive programs share ``B`` tiles in L2.
    """
    pid, batch = tl.program_id(0), tl.program_id(1).to(tl.int64)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group
    pid_n = (pid % (GROUP_M * tiles_n)) // group
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + batch * s_ab + rm[:, None].to(tl.int64) * s_am + rk[None, :] * s_ak
    b_ptrs = b_ptr + batch * s_bb + rk[:, None].to(tl.int64) * s_bk + rn[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k * BLOCK_K + rk
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptrs, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    if HAS_BIAS:
        bias = tl.load(bias_ptr + batch * s_biasb + rn, mask=rn < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    col = (rn // split) * s_c_hi + (rn % split) * s_c_lo
    c_ptrs = c_ptr + batch * s_cb + rm[:, None].to(tl.int64) * s_cm + col[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.autotune(configs=FUSED_CONFIGS, key=["M1", "M0", "N1", "R", "HAS_BIAS"])
@triton.jit
def btt2_fused_kernel(
    x_ptr, w0_ptr, w1_ptr, bias_ptr, y_ptr, ROWS, M1, M0, N1, R,
    s_xn, s_xd, s_w0a, s_w0b, s_w0c, s_w1a, s_w1b, s_w1c, s_yn, s_yd,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    RP: tl.constexpr, M0P: tl.constexpr, N1P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``y[n, j0, :] = sum_{i1} z[n, i1, j0, :] @ w1[j0, :, (:, i1)]^T`` with
    ``z[n, i1, j0, :] = x[n, i1, :] @ w0[i1, (j0, :), :]^T``, both stages in one program.

    Grid ``(n0, row tiles)``: ``j0`` varies fastest, so the ``n0`` programs that re-read one row
    tile of ``x`` run together and find it in L2. Per ``i1``: a ``(BLOCK_N x m0) @ (m0 x RP)``
    and a ``(BLOCK_N x RP) @ (RP x n1)`` product, the rank padded with zeros to ``RP >= 16``.
    """
    j0, pid_n = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ri0 = tl.arange(0, M0P)
    rr = tl.arange(0, RP)
    rj1 = tl.arange(0, N1P)
    x_ptrs = x_ptr + rn[:, None].to(tl.int64) * s_xn + ri0[None, :] * s_xd
    x_mask = (rn[:, None] < ROWS) & (ri0[None, :] < M0)
    # w0[i1, j0*R + rho, i0] as an (m0 x RP) tile; w1[j0, j1, rho*M1 + i1] as an (RP x n1) tile
    w0_ptrs = w0_ptr + (j0 * R + rr[None, :]) * s_w0b + ri0[:, None] * s_w0c
    w0_mask = (rr[None, :] < R) & (ri0[:, None] < M0)
    w1_ptrs = w1_ptr + j0 * s_w1a + rj1[None, :] * s_w1b + (rr[:, None] * M1) * s_w1c
    w1_mask = (rr[:, None] < R) & (rj1[None, :] < N1)
    acc = tl.zeros((BLOCK_N, N1P), dtype=tl.float32)
    for i1 in range(0, M1):
        xt = tl.load(x_ptrs + i1 * M0 * s_xd, mask=x_mask, other=0.0)
        w0t = tl.load(w0_ptrs + i1 * s_w0a, mask=w0_mask, other=0.0)
        z = tl.dot(xt, w0t, input_precision=PRECISION)  # (BLOCK_N, RP), fp32
        w1t = tl.load(w1_ptrs + i1 * s_w1c, mask=w1_mask, other=0.0)
        # the intermediate is rounded to the input dtype, as the two-matmul reference does
        acc = tl.dot(z.to(w1t.dtype), w1t, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + j0 * N1 + rj1, mask=rj1 < N1, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + rn[:, None].to(tl.int64) * s_yn + (j0 * N1 + rj1[None, :]) * s_yd
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rn[:, None] < ROWS) & (rj1 < N1)[None])
