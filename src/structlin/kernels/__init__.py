"""Fast compute paths shared by several structures (pure PyTorch, no compiled extensions)."""

from .btt import btt2_matmul, btt_chain_matmul

__all__ = ["btt2_matmul", "btt_chain_matmul"]
