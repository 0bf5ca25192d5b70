"""The 2-core BTT product as ``torch.library`` custom ops: ``structlin::btt2`` and its backward.

Why custom ops: a structured matmul written as an ``autograd.Function`` around a ctypes call is
invisible to everything that works below autograd. ``torch.func`` (``grad``, ``vmap``,
per-sample gradients) refuses such a Function, ``FlopCounterMode`` and other dispatch modes
cannot see the C kernel, and ``torch.compile`` must break the graph around it. As a custom op
the product is one node that every transform understands:

* ``structlin::btt2(x, w0, w1, bias, fused, triton=False) -> (y, z)``: ``y = BTT(x) + bias``,
  ``(N, n0*n1)``, and ``z``, the intermediate the backward needs (``N * m1 * n0 * r`` values).
  ``fused`` and ``triton`` name the implementation, and with it the layout of ``z``: the fused
  CPU C kernel of :mod:`.cpu_jit` (``fused``: ``(N, m1, n0*r)``), the Triton kernels of
  :mod:`.triton_btt` (``triton``: ``z`` is empty, ``(0,)``, because the one-kernel forward never
  writes the intermediate and the backward recomputes it) or the batch-last ``torch.bmm`` path
  (``(n0, r*m1, N)``, the permuted intermediate). The caller decides from the device, dtype and
  shapes before the op runs, so the fake (meta) implementation knows the shape of ``z`` too.
* ``structlin::btt2_backward(x, w0, w1, z, grad, fused, need_dx, need_dw0, need_dw1, need_db,
  triton=False) -> (dx, dw0, dw1, db)``: gradients that are not needed come back as empty
  tensors.

Which implementation runs: CUDA tensors take Triton when it is installed (``STRUCTLIN_TRITON=0``
turns it off; ``STRUCTLIN_TRITON=force`` also routes CPU tensors to it when Triton's interpreter
is on, ``TRITON_INTERPRET=1``, which is how the CPU test suite runs the Triton branch of the op);
float32 CPU tensors take the C kernel where it measured faster; everything else ``torch.bmm``.

Registered with each op: a fake implementation (shapes only, for ``torch.compile`` and
``FakeTensorMode``), the autograd formula (forward op only), a vmap rule and a FLOP formula, so
``FlopCounterMode`` counts ``2 * layer.macs(N)`` through the fast path as through the reference
one.

Double backward: with ``create_graph=True`` the backward is computed from differentiable torch
ops (the intermediate is recomputed with a graph) instead of the backward op, so Hessian-vector
products work. Only the first-order backward runs the C kernel.

Cost, with ``P1 = N m1 (n0 r) m0`` and ``P2 = N n0 n1 (r m1)`` MACs for the two stages: the
forward is ``P1 + P2``; the backward ``P2`` (``dw1``) ``+ P2`` (gradient of ``z``, when ``dx`` or
``dw0`` is needed) ``+ P1`` (``dw0``) ``+ P1`` (``dx``).
"""

import os
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import cpu_jit

__all__ = ["btt2", "btt2_macs"]

_Grads = tuple[Tensor, Tensor, Tensor, Tensor]


def _sizes(w0: Tensor, w1: Tensor) -> tuple[int, int, int, int, int]:
    """``(m1, m0, n0, n1, r)`` from ``w0: (m1, n0*r, m0)`` and ``w1: (n0, n1, r*m1)``."""
    m1, h, m0 = w0.shape
    n0, n1, _ = w1.shape
    return m1, m0, n0, n1, h // n0


def btt2_macs(batch: int, w0_shape: tuple[int, ...], w1_shape: tuple[int, ...]) -> tuple[int, int]:
    """MACs ``(P1, P2)`` of the two stages of a 2-core BTT product on ``batch`` rows."""
    m1, h, m0 = w0_shape
    n0, n1, k = w1_shape
    return batch * m1 * h * m0, batch * n0 * n1 * k


# ---------------------------------------------------------------- the batch-last torch path


def stage1(x: Tensor, w0: Tensor, n0: int, r: int) -> Tensor:
    """``(N, m1*m0) -> (n0, r*m1, N)``: block-diagonal core 0, then the inter-core permutation."""
    m1, _, m0 = w0.shape
    batch = x.shape[0]
    xt = x.reshape(batch, m1, m0).permute(1, 2, 0)  # (m1, m0, N), strided view when possible
    z = torch.bmm(w0, xt)  # (m1, n0*r, N)
    # contiguous(): for r = 1 the reshape is a view whose matrices have no unit-stride row, which
    # sends the next bmm down a slow path; an explicit copy of contiguous runs is cheaper.
    return z.view(m1, n0, r, batch).permute(1, 2, 0, 3).reshape(n0, r * m1, batch).contiguous()


def batch_first(y: Tensor, bias: Tensor | None, fused: bool = True) -> Tensor:
    """``(P, N, n) -> (N, P*n)``, adding ``bias`` in the same pass when ``fused``.

    The fused form writes through ``out=``, which autograd cannot differentiate: use it only
    below autograd (inside an op implementation).
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


def _torch_forward(x: Tensor, w0: Tensor, w1: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    _, _, n0, _, r = _sizes(w0, w1)
    zp = stage1(x, w0, n0, r)  # (n0, r*m1, N)
    y = torch.bmm(zp.mT, w1.mT)  # (n0, N, n1)
    return batch_first(y, bias), zp


def _torch_backward(
    x: Tensor, w0: Tensor, w1: Tensor, zp: Tensor, grad: Tensor, need: tuple[bool, ...]
) -> list[Tensor | None]:
    """``[dx, dw0, dw1, db]`` (None where not ``need``ed) from the permuted intermediate ``zp``.

    Every op is differentiable, so with a ``zp`` recomputed under grad mode this is also the
    double-backward path."""
    m1, m0, n0, n1, r = _sizes(w0, w1)
    batch = x.shape[0]
    gb = grad.reshape(batch, n0, n1).transpose(0, 1)  # (n0, N, n1), strided view
    out: list[Tensor | None] = [None, None, None, None]
    if need[2]:
        # (K, N) @ (N, n1) with both operands row-major ran ~1.4x faster in MKL than the
        # transposed product; the transpose of the small result is cheap.
        out[2] = torch.bmm(zp, gb).mT.contiguous()
    if need[0] or need[1]:
        dzp = torch.bmm(w1.mT, gb.mT)  # (n0, r*m1, N)
        dz = dzp.view(n0, r, m1, batch).permute(2, 0, 1, 3).reshape(m1, n0 * r, batch)
        dz = dz.contiguous()
        if need[1]:
            out[1] = torch.bmm(dz, x.reshape(batch, m1, m0).transpose(0, 1))
        if need[0]:
            out[0] = torch.bmm(dz.mT, w0).transpose(0, 1).reshape(batch, m1 * m0)
    if need[3]:
        out[3] = grad.sum(0)
    return out


# ---------------------------------------------------------------- the ops


def _use_fused(x: Tensor, w0: Tensor, w1: Tensor, bias: Tensor | None) -> bool:
    """Whether the C kernel computes this product; depends on shapes, dtype and device only."""
    if (
        x.device.type != "cpu"
        or x.dim() != 2
        or any(
            t is not None and (t.device.type != "cpu" or t.dtype != x.dtype) for t in (w0, w1, bias)
        )
    ):
        return False
    if x.shape[1] != w0.shape[0] * w0.shape[2]:
        return False  # the torch path raises the error
    bias_shape = tuple(bias.shape) if bias is not None else None
    return _fused_for(x.dtype, tuple(w0.shape), tuple(w1.shape), bias_shape)


def _constant_when_compiled(fn: Any) -> Any:
    """``torch.compiler.assume_constant_result`` without its ``import torch._dynamo`` (about
    1.8 s, which would land on every ``import structlin``): that decorator only sets this flag,
    which dynamo reads when it traces a call. tests/layers/test_custom_ops.py checks that the
    public decorator still sets the same flag, and that compiled graphs have no break."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_when_compiled
def _fused_for(
    dtype: torch.dtype,
    w0_shape: tuple[int, ...],
    w1_shape: tuple[int, ...],
    bias_shape: tuple[int, ...] | None,
) -> bool:
    # assume_constant_result: torch.compile evaluates this once when tracing (building the C
    # kernel is not traceable) and bakes the answer into the graph. Only the cores' shapes go
    # in: the batch and (under dynamic shapes) the input width may be symbolic.
    in_features = w0_shape[0] * w0_shape[2]
    kernel = cpu_jit.kernel_for_shapes("cpu", dtype, in_features, w0_shape, w1_shape, bias_shape)
    return kernel is not None


def _fused_kernel(x: Tensor, w0: Tensor, w1: Tensor) -> cpu_jit.BTT2Kernel:
    kernel = cpu_jit.kernel_for_shapes(
        "cpu", x.dtype, x.shape[1], tuple(w0.shape), tuple(w1.shape), None
    )
    if kernel is None:  # the caller's _use_fused said yes: only a changed environment gets here
        raise RuntimeError("structlin::btt2: fused=True but the CPU kernel is not available")
    return kernel


def _forward_impl(
    x: Tensor, w0: Tensor, w1: Tensor, bias: Tensor | None, fused: bool, triton: bool = False
) -> tuple[Tensor, Tensor]:
    if triton:
        return _triton_module().btt2_triton_forward(x, w0, w1, bias), x.new_empty(0)
    if fused:
        return _fused_kernel(x, w0, w1).forward(x.contiguous(), w0, w1, bias)
    return _torch_forward(x, w0, w1, bias)


def _backward_impl(
    x: Tensor,
    w0: Tensor,
    w1: Tensor,
    z: Tensor,
    grad: Tensor,
    fused: bool,
    need: tuple,
    triton: bool = False,
) -> list[Tensor | None]:
    grad = grad.to(x.dtype)
    if triton:  # z is empty: the Triton backward recomputes the intermediate
        return list(_triton_module().btt2_triton_backward(grad, x, w0, w1, need))
    if fused:
        kernel = _fused_kernel(x, w0, w1)
        outs = kernel.backward(x.contiguous(), w0, w1, z, grad.contiguous(), need[0], need[3])
        return [o if n else None for o, n in zip(outs, need, strict=True)]
    return _torch_backward(x, w0, w1, z, grad, need)


@torch.library.custom_op("structlin::btt2", mutates_args=())
def _btt2_op(
    x: Tensor, w0: Tensor, w1: Tensor, bias: Tensor | None, fused: bool, triton: bool = False
) -> tuple[Tensor, Tensor]:
    return _forward_impl(x, w0, w1, bias, fused, triton)


@_btt2_op.register_fake
def _btt2_fake(
    x: Tensor, w0: Tensor, w1: Tensor, bias: Tensor | None, fused: bool, triton: bool = False
) -> tuple[Tensor, Tensor]:
    m1, _, n0, n1, r = _sizes(w0, w1)
    batch = x.shape[0]
    y = x.new_empty(batch, n0 * n1)
    if triton:
        return y, x.new_empty(0)
    z = x.new_empty(batch, m1, n0 * r) if fused else x.new_empty(n0, r * m1, batch)
    return y, z


@torch.library.custom_op("structlin::btt2_backward", mutates_args=())
def _btt2_backward_op(
    x: Tensor,
    w0: Tensor,
    w1: Tensor,
    z: Tensor,
    grad: Tensor,
    fused: bool,
    need_dx: bool,
    need_dw0: bool,
    need_dw1: bool,
    need_db: bool,
    triton: bool = False,
) -> _Grads:
    need = (need_dx, need_dw0, need_dw1, need_db)
    outs = _backward_impl(x, w0, w1, z, grad, fused, need, triton)
    empty = x.new_empty(0)
    return tuple(o if o is not None else empty.clone() for o in outs)  # type: ignore[return-value]


@_btt2_backward_op.register_fake
def _btt2_backward_fake(
    x: Tensor,
    w0: Tensor,
    w1: Tensor,
    z: Tensor,
    grad: Tensor,
    fused: bool,
    need_dx: bool,
    need_dw0: bool,
    need_dw1: bool,
    need_db: bool,
    triton: bool = False,
) -> _Grads:
    shapes = (x.shape, w0.shape, w1.shape, grad.shape[1:])
    need = (need_dx, need_dw0, need_dw1, need_db)
    return tuple(x.new_empty(s if n else (0,)) for s, n in zip(shapes, need, strict=True))  # type: ignore[return-value]


# ---------------------------------------------------------------- autograd


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, w0, w1, _, fused, *triton = inputs
    ctx.save_for_backward(x, w0, w1, output[1])
    ctx.fused = fused
    ctx.triton = bool(triton and triton[0])


def _backward(ctx: Any, grad: Tensor, _grad_z: Tensor | None, direct: bool = False) -> tuple:
    """The gradients; through the backward op, or its implementation when ``direct``."""
    x, w0, w1, z = ctx.saved_tensors
    need = tuple(ctx.needs_input_grad[:4])
    if torch.is_grad_enabled():
        # create_graph=True: the saved intermediate has no graph back to x and w0 (and after
        # the C kernel it is in the C layout), so recompute it with differentiable ops.
        _, _, n0, _, r = _sizes(w0, w1)
        grads = _torch_backward(x, w0, w1, stage1(x, w0, n0, r), grad, need)
    elif direct:
        grads = _backward_impl(x, w0, w1, z, grad, ctx.fused, need, ctx.triton)
    else:
        outs = _btt2_backward_op(x, w0, w1, z, grad, ctx.fused, *need, ctx.triton)
        grads = [o if n else None for o, n in zip(outs, need, strict=True)]
    return (*grads, None, None)


_btt2_op.register_autograd(_backward, setup_context=_setup_context)


class _BTT2Function(torch.autograd.Function):
    """The op with the same autograd formula, as a Function ``torch.func`` can transform.

    ``torch.func.grad`` refuses the Function that ``register_autograd`` generates (it has no
    ``setup_context``); this one has it, and ``generate_vmap_rule`` vmaps its forward and
    backward through the ops' own vmap rules."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, w0: Tensor, w1: Tensor, bias: Tensor | None, fused: bool, triton: bool
    ) -> tuple:
        return _btt2_op(x, w0, w1, bias, fused, triton)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_z: Tensor | None) -> tuple:
        return _backward(ctx, grad, grad_z)


class _EagerBTT2(torch.autograd.Function):
    """Plain eager calls skip the dispatcher: the op's implementation with the op's formula.

    Each custom-op call costs Python dispatch layers (about 0.1 ms per call on a 2-core CPU,
    forward or backward), as much as the whole product at small widths. When nothing observes
    the call (no compiler, dispatch mode or ``torch.func`` transform, plain tensors), running
    the implementation directly computes exactly what the op would."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, w0: Tensor, w1: Tensor, bias: Tensor | None, fused: bool, triton: bool
    ):
        y, z = _forward_impl(x, w0, w1, bias, fused, triton)
        ctx.save_for_backward(x, w0, w1, z)
        ctx.fused = fused
        ctx.triton = triton
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        return _backward(ctx, grad, None, direct=True)


# torch offers no public query for "a torch.func transform is active" (its own autograd.Function
# machinery asks this private one). Where it is missing or renamed, every call takes the op:
# slower by the dispatch layers, never wrong (tests/layers/test_custom_ops.py checks both routes).
try:
    _transforms_active = torch._C._are_functorch_transforms_active
except AttributeError:  # a torch without the query: assume a transform may be active

    def _transforms_active() -> bool:
        return True


def _observed(*tensors: Tensor | None) -> bool:
    """Whether the call must go through the ops (something other than eager autograd sees it)."""
    return (
        torch.compiler.is_compiling()
        or cpu_jit._in_dispatch_mode()
        or _transforms_active()
        or any(t is not None and type(t) not in _PLAIN for t in tensors)
    )


_PLAIN = (Tensor, torch.nn.Parameter)


# ---------------------------------------------------------------- vmap


def _loop_rule(op: Any, info: Any, in_dims: tuple, args: tuple) -> tuple[tuple, tuple]:
    """Any batching: one op call per vmapped index, outputs stacked along dim 0."""
    outs = [
        op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims, strict=True)))
        for i in range(info.batch_size)
    ]
    stacked = tuple(torch.stack(column) for column in zip(*outs, strict=True))
    return stacked, (0,) * len(stacked)


def _btt2_vmap(info: Any, in_dims: tuple, x: Tensor, w0: Tensor, w1: Tensor, *rest: Any) -> tuple:
    """Only ``x`` batched (vmap over examples): fold the vmapped dimension into the rows, one
    call; batched cores or bias: one call per index."""
    if in_dims[0] is None or any(d is not None for d in in_dims[1:]):
        return _loop_rule(_btt2_op, info, in_dims, (x, w0, w1, *rest))
    xb = x.movedim(in_dims[0], 0)
    vb, rows = xb.shape[:2]
    y, z = _btt2_op(xb.reshape(vb * rows, xb.shape[2]), w0, w1, *rest)
    y = y.view(vb, rows, y.shape[1])
    if len(rest) > 2 and rest[2]:  # triton: z is empty, (0,) per vmapped index
        return (y, z.new_empty(vb, 0)), (0, 0)
    if rest[1]:  # fused: z is (N, m1, n0*r)
        return (y, z.view(vb, rows, *z.shape[1:])), (0, 0)
    return (y, z.view(z.shape[0], z.shape[1], vb, rows)), (0, 2)


def _btt2_backward_vmap(info: Any, in_dims: tuple, *args: Any) -> tuple:
    # The weight gradients differ per vmapped index (per-example gradients), so no fold.
    return _loop_rule(_btt2_backward_op, info, in_dims, args)


torch.library.register_vmap("structlin::btt2", _btt2_vmap)
torch.library.register_vmap("structlin::btt2_backward", _btt2_backward_vmap)


# ---------------------------------------------------------------- FLOP formulas


def _forward_flops(x_shape: Any, w0_shape: Any, w1_shape: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * sum(btt2_macs(x_shape[0], w0_shape, w1_shape))


def _backward_flops(
    x_shape: Any,
    w0_shape: Any,
    w1_shape: Any,
    _z: Any,
    _grad: Any,
    _fused: bool,
    *need: Any,
    **kwargs: Any,
) -> int:
    need_dx, need_dw0, need_dw1 = need[:3]
    p1, p2 = btt2_macs(x_shape[0], w0_shape, w1_shape)
    macs = p2 * need_dw1 + (p2 if need_dx or need_dw0 else 0) + p1 * need_dw0 + p1 * need_dx
    return 2 * macs


def _register_flop_formulas() -> None:
    try:
        from torch.utils.flop_counter import register_flop_formula
    except ImportError:  # an older torch: FlopCounterMode then counts nothing for these ops
        return
    register_flop_formula(torch.ops.structlin.btt2)(_forward_flops)
    register_flop_formula(torch.ops.structlin.btt2_backward)(_backward_flops)


_register_flop_formulas()


# ---------------------------------------------------------------- entry point


def _triton_module() -> ModuleType:
    from . import triton_btt  # imports nothing from triton until a kernel is launched

    return triton_btt


def _triton_btt2(x: Tensor) -> ModuleType | None:
    """The Triton module when it computes ``x``'s product, else None (see :func:`_triton_for`)."""
    return _triton_module() if _triton_for(x.device.type) else None


@_constant_when_compiled
def _triton_for(device_type: str) -> bool:
    """Whether Triton runs the op for tensors on ``device_type``: CUDA when triton is installed
    and ``STRUCTLIN_TRITON`` is not ``0``; the CPU only with ``STRUCTLIN_TRITON=force`` and
    Triton's interpreter on. Read once per device type, like the CPU kernel's decision."""
    setting = os.environ.get("STRUCTLIN_TRITON", "1").strip().lower()
    if setting in ("0", "false", "off") or device_type not in ("cuda", "cpu"):
        return False
    if device_type == "cpu" and setting != "force":
        return False
    try:
        from . import triton_btt
    except ImportError:  # its module is missing from a trimmed install
        return False
    return triton_btt.triton_available(device_type)


def btt2(x: Tensor, w0: Tensor, w1: Tensor, bias: Tensor | None = None) -> Tensor:
    """2-core BTT product ``(N, m1*m0) -> (N, n0*n1)`` plus ``bias``, through the custom op.

    ``w0``: ``(m1, n0*r, m0)``; ``w1``: ``(n0, n1, r*m1)``; ``bias``: ``(n0*n1,)`` or None, all of
    one dtype. Float32 on the CPU runs the fused C kernel where it is faster; CUDA tensors run the
    Triton kernels of ``structlin.kernels.triton_btt`` inside the op when triton is installed
    (``STRUCTLIN_TRITON=0`` turns them off); everything else runs batch-last ``torch.bmm`` calls.
    """
    triton = _triton_for(x.device.type) and x.dim() == 2
    fused = not triton and _use_fused(x, w0, w1, bias)
    if _observed(x, w0, w1, bias):
        return _BTT2Function.apply(x, w0, w1, bias, fused, triton)[0]
    return _EagerBTT2.apply(x, w0, w1, bias, fused, triton)
