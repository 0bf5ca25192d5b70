"""Fast compute paths shared by several structures: the 2-core BTT matmul (``btt``) registered as
``torch.library`` custom ops (``ops``: fake kernels, autograd, vmap and FLOP formulas, so
``torch.compile``, ``torch.func`` and ``FlopCounterMode`` see one op), a fused C kernel for CPUs
compiled on first use when a C compiler is present (``cpu_jit``) and Triton kernels for CUDA
(``triton_btt``, loaded only when triton is installed)."""

from . import cpu_jit, ops
from .btt import btt2_matmul, btt_chain_matmul

__all__ = ["btt2_matmul", "btt_chain_matmul", "cpu_jit", "ops"]
