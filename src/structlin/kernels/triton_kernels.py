"""Triton kernels of the 2-core BTT product (imported only when Triton is installed).

Index names follow :mod:`.btt`: ``x[n, i1, i0]`` (``N x m1*m0``), ``w0[i1, (j0, rho), i0]``,
``w1[j0, j1, (rho, i1)]``, ``y[n, j0, j1]`` (``N x n0*n1``), rank ``r``.

Four kernels:

* :func:`bmm_kernel`, a batched matmul whose three operands are addressed through strides, the
  output's column index optionally split in two (``col // split``, ``col % split``) with a stride
  each. Every stage of the forward and the backward is one launch of it, with the BTT layout
  permutations folded into these strides: nothing is ever copied into another layout.
* :func:`btt2_fused_kernel`, the forward with both stages in one kernel: one program owns a row
  tile of ``x`` and one output block ``j0``; for each ``i1`` it computes the tile's slice
  ``z[:, i1, j0, :]`` (``BLOCK_N x r``, padded to 16 columns for the tensor cores) and
  contracts it at once into the ``BLOCK_N x n1`` output accumulator, so the intermediate never
  leaves the chip. Used for ranks up to 16 and block widths ``m0, n1`` up to 256.
* :func:`btt2_grad_w_kernel` and :func:`btt2_grad_x_kernel`, the backward in two kernels under
  the same limits, neither writing the intermediate ``z`` or its gradient ``dz`` to memory: the
  first gives ``dw0``, ``dw1`` (and the bias gradient) with one program per block ``(i1, j0)``
  looping over all rows, the second ``dx`` with one program per ``(i1, row tile)`` looping over
  ``j0``. Each recomputes the slices of ``z`` / ``dz`` it needs on chip (``r`` is small: this
  costs ``N r (d_in n0 + d_out m1)`` MACs per kernel). No atomics: the result is deterministic.

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
    GRAD_CONFIGS = [triton.Config({"BLOCK_N": 32})]
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
    # The backward kernels hold two or three (BLOCK_N x 256) tiles at the largest blocks, so the
    # row tile stays at 128 or below; the weight kernel streams over all rows, where deeper
    # pipelining pays off.
    GRAD_CONFIGS = [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in [(32, 4, 3), (64, 4, 3), (64, 8, 4), (128, 8, 3), (128, 4, 2)]
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


@triton.autotune(configs=GRAD_CONFIGS, key=["M1", "M0", "N1", "R", "NEED_W0", "NEED_W1", "NEED_B"])
@triton.jit
def btt2_grad_w_kernel(
    x_ptr, w0_ptr, w1_ptr, g_ptr, dw0_ptr, dw1_ptr, db_ptr, ROWS, M1, M0, N0, N1, R,
    s_xn, s_xd, s_w0a, s_w0b, s_w0c, s_w1a, s_w1b, s_w1c, s_gn, s_gd,
    NEED_W0: tl.constexpr, NEED_W1: tl.constexpr, NEED_B: tl.constexpr, PRECISION: tl.constexpr,
    RP: tl.constexpr, M0P: tl.constexpr, N1P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Weight gradients of one block pair: ``dw1[j0, :, (:, i1)] = g[:, j0, :]^T z[:, i1, j0, :]``
    and ``dw0[i1, (j0, :), :] = dz[:, i1, j0, :]^T x[:, i1, :]``, summed over all rows, with
    ``z = x[:, i1, :] @ w0[i1, (j0, :), :]^T`` and ``dz = g[:, j0, :] @ w1[j0, :, (:, i1)]``
    recomputed per row tile. ``dw0`` and ``dw1`` are contiguous; ``db`` (``n0 n1``) is written
    by the programs with ``i1 = 0``.

    Grid ``(m1 n0,)`` with ``i1`` fastest. All programs walk the rows in the same order, so the
    row tiles of ``x`` and ``g`` they read at one time stay in L2.
    """
    pid = tl.program_id(0)
    i1, j0 = pid % M1, pid // M1
    ri0 = tl.arange(0, M0P)
    rr = tl.arange(0, RP)
    rj1 = tl.arange(0, N1P)
    r_ok, i0_ok, j1_ok = rr < R, ri0 < M0, rj1 < N1
    # w0[i1, j0*R + rho, i0] as (m0 x RP); w1[j0, j1, rho*M1 + i1] as (RP x n1)
    w0_ptrs = w0_ptr + i1 * s_w0a + (j0 * R + rr[None, :]) * s_w0b + ri0[:, None] * s_w0c
    w0t = tl.load(w0_ptrs, mask=i0_ok[:, None] & r_ok[None, :], other=0.0)
    w1_ptrs = w1_ptr + j0 * s_w1a + rj1[None, :] * s_w1b + (rr[:, None] * M1 + i1) * s_w1c
    w1t = tl.load(w1_ptrs, mask=r_ok[:, None] & j1_ok[None, :], other=0.0)
    acc_w0 = tl.zeros((RP, M0P), dtype=tl.float32)
    acc_w1 = tl.zeros((N1P, RP), dtype=tl.float32)
    acc_b = tl.zeros((N1P,), dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        row_ok = rn[:, None] < ROWS
        g_ptrs = g_ptr + rn[:, None].to(tl.int64) * s_gn + (j0 * N1 + rj1[None, :]) * s_gd
        gt = tl.load(g_ptrs, mask=row_ok & j1_ok[None, :], other=0.0)
        if NEED_B:
            acc_b += tl.sum(gt.to(tl.float32), axis=0)
        if NEED_W0 or NEED_W1:
            x_ptrs = x_ptr + rn[:, None].to(tl.int64) * s_xn + (i1 * M0 + ri0[None, :]) * s_xd
            xt = tl.load(x_ptrs, mask=row_ok & i0_ok[None, :], other=0.0)
            if NEED_W1:
                z = tl.dot(xt, w0t, input_precision=PRECISION)  # (BLOCK_N, RP)
                # the intermediate is rounded to the input dtype, as the reference does
                acc_w1 = tl.dot(tl.trans(gt), z.to(gt.dtype), acc_w1, input_precision=PRECISION)
            if NEED_W0:
                dz = tl.dot(gt, tl.trans(w1t), input_precision=PRECISION)  # (BLOCK_N, RP)
                acc_w0 = tl.dot(tl.trans(dz.to(xt.dtype)), xt, acc_w0, input_precision=PRECISION)
    if NEED_W0:  # contiguous dw0[i1, j0*R + rho, i0]
        ptrs = dw0_ptr + ((i1 * N0 + j0) * R + rr[:, None]) * M0 + ri0[None, :]
        tl.store(ptrs, acc_w0.to(dw0_ptr.dtype.element_ty), mask=r_ok[:, None] & i0_ok[None, :])
    if NEED_W1:  # contiguous dw1[j0, j1, rho*M1 + i1]
        ptrs = dw1_ptr + (j0 * N1 + rj1[:, None]) * (R * M1) + rr[None, :] * M1 + i1
        tl.store(ptrs, acc_w1.to(dw1_ptr.dtype.element_ty), mask=j1_ok[:, None] & r_ok[None, :])
    if NEED_B:
        db = acc_b.to(db_ptr.dtype.element_ty)
        tl.store(db_ptr + j0 * N1 + rj1, db, mask=rj1 < tl.where(i1 == 0, N1, 0))


@triton.autotune(configs=GRAD_CONFIGS, key=["M1", "M0", "N1", "R"])
@triton.jit
def btt2_grad_x_kernel(
    g_ptr, w0_ptr, w1_ptr, dx_ptr, ROWS, M1, M0, N0, N1, R,
    s_gn, s_gd, s_w0a, s_w0b, s_w0c, s_w1a, s_w1b, s_w1c, s_dxn, s_dxd,
    PRECISION: tl.constexpr,
    RP: tl.constexpr, M0P: tl.constexpr, N1P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``dx[n, i1, :] = sum_{j0} dz[n, i1, j0, :] @ w0[i1, (j0, :), :]`` with
    ``dz[n, i1, j0, :] = g[n, j0, :] @ w1[j0, :, (:, i1)]`` computed on chip per ``j0``.

    Grid ``(m1, row tiles)``: ``i1`` fastest, so the ``m1`` programs that re-read one row tile
    of ``g`` run together and find it in L2. Per ``j0``: a ``(BLOCK_N x n1) @ (n1 x RP)`` and a
    ``(BLOCK_N x RP) @ (RP x m0)`` product, the rank padded with zeros to ``RP >= 16``.
    """
    i1, pid_n = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ri0 = tl.arange(0, M0P)
    rr = tl.arange(0, RP)
    rj1 = tl.arange(0, N1P)
    g_ptrs = g_ptr + rn[:, None].to(tl.int64) * s_gn + rj1[None, :] * s_gd
    g_mask = (rn[:, None] < ROWS) & (rj1[None, :] < N1)
    # w1[j0, j1, rho*M1 + i1] as (n1 x RP); w0[i1, j0*R + rho, i0] as (RP x m0)
    w1_ptrs = w1_ptr + rj1[:, None] * s_w1b + (rr[None, :] * M1 + i1) * s_w1c
    w1_mask = (rj1[:, None] < N1) & (rr[None, :] < R)
    w0_ptrs = w0_ptr + i1 * s_w0a + rr[:, None] * s_w0b + ri0[None, :] * s_w0c
    w0_mask = (rr[:, None] < R) & (ri0[None, :] < M0)
    acc = tl.zeros((BLOCK_N, M0P), dtype=tl.float32)
    for j0 in range(0, N0):
        gt = tl.load(g_ptrs + j0 * N1 * s_gd, mask=g_mask, other=0.0)
        w1t = tl.load(w1_ptrs + j0 * s_w1a, mask=w1_mask, other=0.0)
        dz = tl.dot(gt, w1t, input_precision=PRECISION)  # (BLOCK_N, RP), fp32
        w0t = tl.load(w0_ptrs + j0 * R * s_w0b, mask=w0_mask, other=0.0)
        # dz is rounded to the input dtype, as the reference does
        acc = tl.dot(dz.to(w0t.dtype), w0t, acc, input_precision=PRECISION)
    dx_ptrs = dx_ptr + rn[:, None].to(tl.int64) * s_dxn + (i1 * M0 + ri0[None, :]) * s_dxd
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(rn[:, None] < ROWS) & (ri0 < M0)[None])
