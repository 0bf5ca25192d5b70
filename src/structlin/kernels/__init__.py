"""Fast compute paths shared by several structures: batched-matmul paths in PyTorch (``btt``) and,
on CPUs, a fused C kernel compiled on first use when a C compiler is present (``cpu_jit``)."""

from . import cpu_jit
from .btt import btt2_matmul, btt_chain_matmul

__all__ = ["btt2_matmul", "btt_chain_matmul", "cpu_jit"]
