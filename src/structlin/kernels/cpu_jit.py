"""The fused C kernel for the 2-core BTT product on CPU (``btt2_cpu.c``), built on first use.

Why a C kernel: on a CPU the batched-GEMM path of :mod:`structlin.kernels.btt` spends a third of a
step on the layout copies around its ``torch.bmm`` calls (the inter-core permutation, the
batch-first output, the input gradient), and ``torch.bmm`` cannot write with a leading dimension
that would avoid them. The C kernel never leaves the caller's batch-first layout, so each
activation is read and written once per pass (benchmarks/RESULTS.md has the measurements).

How it is built: the first float32 CPU call for a given divisibility class of the shape compiles
``btt2_cpu.c`` with the system C compiler (``$CC``, default ``cc``; ``-O3 -march=native
-fopenmp``, about half a second) into ``$STRUCTLIN_CACHE`` (default ``~/.cache/structlin``)
and loads it with ``ctypes``. The library name carries a hash of the source, the flags and the
CPU's feature flags, and is written atomically, so concurrent processes and shared home
directories are safe. OpenMP resolves to the ``libgomp`` that PyTorch already loaded, so the
kernel shares PyTorch's threads and follows ``torch.set_num_threads``.

When it is used (see :func:`kernel_for`): float32 tensors on the CPU, inside the
``structlin::btt2`` custom op (:mod:`.ops`; a bare call outside it is refused under
``torch.compile`` tracing and dispatch modes such as ``FlopCounterMode``, which must see ops),
with ``M0``, ``H = N0*r``, ``K = r*M1`` and ``N1`` all multiples of 8, blocks of at most 32 and
rank at most 2, which is where it measured faster (BTT rank 1-2 up to ``d = 1024``; Monarch with
``sqrt(d)`` blocks). Everything else, and any machine where the build fails (no compiler, no
OpenMP, e.g. stock macOS), takes the ``torch.bmm`` path; a failed build warns once.
``STRUCTLIN_CPU_KERNEL=0`` turns the C kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import torch

__all__ = ["BTT2Kernel", "available", "cache_dir", "enabled", "kernel_for", "kernel_for_shapes"]

_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# Where the C kernel beats the torch.bmm path (forward+backward, batch 512, 2-core AVX2 CPU,
# benchmarks/RESULTS.md): 1.3x at 32x32 blocks and rank 1, 1.1x at 24x32 blocks and rank 1 and at
# 32x32 blocks and rank 2; slower at rank 4 (0.85x) and at 64x64 blocks (0.8x at rank 1).
_MAX_BLOCK = 32
_MAX_RANK = 2
_P = ctypes.c_void_p

try:
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode as _is_in_torch_dispatch_mode
except ImportError:  # a torch without this helper: assume a mode may be active, never use C

    def _is_in_torch_dispatch_mode() -> bool:
        return True


class _Shape(ctypes.Structure):
    _fields_ = [("B", ctypes.c_long)] + [(n, ctypes.c_int) for n in ("M1", "M0", "N0", "N1", "R")]


def enabled() -> bool:
    """False when ``STRUCTLIN_CPU_KERNEL`` is set to ``0``/``false``/``off``."""
    return os.environ.get("STRUCTLIN_CPU_KERNEL", "1").strip().lower() not in ("0", "false", "off")


def cache_dir() -> Path:
    """Built kernels live in ``$STRUCTLIN_CACHE/kernels`` (default ``~/.cache/structlin``)."""
    root = os.environ.get("STRUCTLIN_CACHE") or Path.home() / ".cache" / "structlin"
    return Path(root) / "kernels"


def _nv(dim: int) -> int:
    """8-float vectors per inner-loop chunk for a dimension (a multiple of 8)."""
    return 4 if dim % 32 == 0 else 2 if dim % 16 == 0 else 1


def _cpu_fingerprint() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}|{flags}"


class BTT2Kernel:
    """``btt2_cpu.c`` compiled for one factor shape (any batch size)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fwd = lib.btt2_forward
        self._fwd.argtypes = [ctypes.POINTER(_Shape), _P, _P, _P, _P, _P, _P, ctypes.c_int]
        self._fwd.restype = None
        self._bwd = lib.btt2_backward
        self._bwd.argtypes = [ctypes.POINTER(_Shape)] + [_P] * 10 + [ctypes.c_int]
        self._bwd.restype = None
        self._scratch = lib.btt2_scratch_per_thread
        self._scratch.argtypes = []
        self._scratch.restype = ctypes.c_long

    @staticmethod
    def _shape(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor) -> _Shape:
        m1, h, m0 = w0.shape
        n0, n1, _ = w1.shape
        return _Shape(x.shape[0], m1, m0, n0, n1, h // n0)

    def forward(
        self, x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, z)``: the output ``(N, n0*n1)`` and the intermediate ``(N, m1, n0*r)`` that
        :meth:`backward` needs. ``x`` must be contiguous."""
        s = self._shape(x, w0, w1)
        w0t = w0.transpose(1, 2).contiguous()
        w1t = w1.transpose(1, 2).contiguous()
        bias = bias.contiguous() if bias is not None else None
        z = x.new_empty(s.B, s.M1, s.N0 * s.R)
        y = x.new_empty(s.B, s.N0 * s.N1)
        self._fwd(
            ctypes.byref(s),
            x.data_ptr(),
            w0t.data_ptr(),
            w1t.data_ptr(),
            bias.data_ptr() if bias is not None else None,
            z.data_ptr(),
            y.data_ptr(),
            torch.get_num_threads(),
        )
        return y, z

    def backward(
        self,
        x: torch.Tensor,
        w0: torch.Tensor,
        w1: torch.Tensor,
        z: torch.Tensor,
        grad: torch.Tensor,
        need_dx: bool,
        need_db: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(dx, dw0, dw1, db)`` for the saved ``x``, ``z`` and a contiguous ``grad``."""
        s = self._shape(x, w0, w1)
        # Held in locals: a temporary's memory could be freed before the C call reads it.
        w0c, w1c = w0.contiguous(), w1.contiguous()
        threads = torch.get_num_threads()
        scratch = x.new_empty(threads * self._scratch())
        dx = torch.empty_like(x) if need_dx else None
        dw0 = torch.empty_like(w0)
        dw1t = w1.new_empty(s.N0, s.R * s.M1, s.N1)
        db = x.new_empty(s.N0 * s.N1) if need_db else None
        self._bwd(
            ctypes.byref(s),
            x.data_ptr(),
            w0c.data_ptr(),
            w1c.data_ptr(),
            z.data_ptr(),
            grad.data_ptr(),
            dx.data_ptr() if dx is not None else None,
            dw0.data_ptr(),
            dw1t.data_ptr(),
            db.data_ptr() if db is not None else None,
            scratch.data_ptr(),
            threads,
        )
        return dx, dw0, dw1t.transpose(1, 2).contiguous(), db


_KERNELS: dict[tuple[int, ...], BTT2Kernel | None] = {}
_WARNED = False


def _build(shape: tuple[int, int, int, int, int]) -> BTT2Kernel | None:
    global _WARNED
    cc = os.environ.get("CC", "cc")
    source = resources.files("structlin.kernels").joinpath("btt2_cpu.c").read_bytes()
    m1, m0, n0, n1, r = shape
    nvs = {"H": _nv(n0 * r), "K": _nv(r * m1), "M0": _nv(m0), "N1": _nv(n1)}
    sizes = {"FM1": m1, "FM0": m0, "FN0": n0, "FN1": n1, "FR": r}
    defines = tuple(f"-DNV_{n}={v}" for n, v in nvs.items()) + tuple(
        f"-D{n}={v}" for n, v in sizes.items()
    )
    key = hashlib.sha256(
        b"\0".join([source, cc.encode(), *(f.encode() for f in _FLAGS + defines)])
        + _cpu_fingerprint().encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"btt2_cpu-{key}.so"
    try:
        if not target.is_file():
            if shutil.which(cc) is None:
                raise RuntimeError(f"C compiler {cc!r} not found")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src = Path(tmp) / "btt2_cpu.c"
                src.write_bytes(source)
                out = Path(tmp) / target.name
                proc = subprocess.run(
                    [cc, *_FLAGS, *defines, str(src), "-o", str(out)],
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr.strip()[-2000:] or f"{cc} failed")
                os.replace(out, target)  # atomic: other processes see all of it or nothing
        return BTT2Kernel(ctypes.CDLL(str(target)))
    except (OSError, RuntimeError, AttributeError) as exc:
        if not _WARNED:
            _WARNED = True
            warnings.warn(
                f"structlin: could not build the fused CPU BTT kernel ({exc}); using the "
                "torch.bmm path, which is slower on CPUs. Set CC to a C compiler with OpenMP "
                "support, or STRUCTLIN_CPU_KERNEL=0 to silence this.",
                RuntimeWarning,
                stacklevel=4,
            )
        return None


def _in_dispatch_mode() -> bool:
    # FlopCounterMode (the trainer's MAC count), FakeTensorMode and other dispatch modes must see
    # the torch ops; a ctypes call would be invisible to them.
    return _is_in_torch_dispatch_mode()


def available() -> bool:
    """Whether the C kernel is on and builds here (compiles a tiny shape on first call)."""
    x = torch.zeros(1, 64)
    return kernel_for(x, torch.zeros(8, 8, 8), torch.zeros(8, 8, 8)) is not None


def kernel_for(
    x: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    in_op: bool = False,
) -> BTT2Kernel | None:
    """The compiled kernel for this call, or None when the ``torch.bmm`` path must be used.

    ``in_op=True``: the caller runs the kernel inside the ``structlin::btt2`` custom op
    (:mod:`.ops`), which the compiler and every dispatch mode see as one op, so the kernel may
    run under them. Inconsistent shapes also get None: the C code trusts its sizes, while the
    torch path raises a proper error for them."""
    tensors = [t for t in (x, w0, w1, bias) if t is not None]
    if (
        any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors)
        or x.dim() != 2
        or (not in_op and (torch.compiler.is_compiling() or _in_dispatch_mode()))
    ):
        return None
    bias_shape = tuple(bias.shape) if bias is not None else None
    return kernel_for_shapes("cpu", torch.float32, x.shape[1], w0.shape, w1.shape, bias_shape)


def kernel_for_shapes(
    device: str,
    dtype: torch.dtype,
    in_features: int,
    w0_shape: tuple[int, ...],
    w1_shape: tuple[int, ...],
    bias_shape: tuple[int, ...] | None,
) -> BTT2Kernel | None:
    """:func:`kernel_for` from plain values, for ``x: (N, in_features)`` and all tensors on
    ``device`` in ``dtype`` (the answer never depends on ``N``, nor on dispatch modes)."""
    if device != "cpu" or dtype != torch.float32 or len(w0_shape) != 3 or len(w1_shape) != 3:
        return None
    if not enabled():
        return None
    m1, h, m0 = w0_shape
    n0, n1, k = w1_shape
    r = h // n0 if n0 else 0
    if (
        r < 1
        or h != n0 * r
        or k != r * m1
        or in_features != m1 * m0
        or (bias_shape is not None and tuple(bias_shape) != (n0 * n1,))
    ):
        return None
    if any(dim % 8 for dim in (h, k, m0, n1)):
        return None
    if r > _MAX_RANK or max(m1, m0, n0, n1) > _MAX_BLOCK:
        # Larger blocks make GEMMs big enough for MKL to win (see _MAX_BLOCK).
        return None
    shape = (m1, m0, n0, n1, r)
    if shape not in _KERNELS:
        _KERNELS[shape] = _build(shape)
    return _KERNELS[shape]
