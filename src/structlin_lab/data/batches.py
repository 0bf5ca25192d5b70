"""Random batches of token windows for language modelling."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["get_batch"]


def get_batch(
    data: np.ndarray,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` random windows of ``block_size + 1`` tokens from ``data``.

    Args:
        data: a 1-D token array, e.g. ``TextData.train`` (a memmap: only the windows are read).
        batch_size: number of windows ``B``.
        block_size: context length ``T``.
        generator: a CPU ``torch.Generator`` that draws the offsets; saving its ``get_state()``
            with a checkpoint lets a resumed run draw exactly the batches it would have drawn.
        device: where the returned tensors live; CUDA copies go through pinned memory,
            asynchronously.

    Returns:
        ``(x, y)``, int64 tensors of shape ``(B, T)`` with ``y[:, t] == x[:, t + 1]`` inside a
        window, i.e. ``y`` holds each position's next token.

    Raises:
        ValueError: ``data`` is not 1-D or is shorter than ``block_size + 1`` tokens, or
            ``batch_size`` / ``block_size`` is not positive.
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError(
            f"batch_size and block_size must be positive; got {batch_size}, {block_size}"
        )
    if data.ndim != 1:
        raise ValueError(f"data must be a 1-D token array; got shape {data.shape}")
    if len(data) < block_size + 1:
        raise ValueError(
            f"data holds {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}; use a "
            "smaller block_size or more text (a small val_fraction can leave val this short)"
        )
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    index = starts.numpy()[:, None] + np.arange(block_size + 1)
    # One fancy-indexing read of just the windows; int64 because embedding lookups want it.
    windows = torch.from_numpy(np.asarray(data[index], dtype=np.int64))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    device = torch.device(device)
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
