"""The paper's residual MLP for images (Qiu et al., ICML 2024, the CIFAR MLP of its experiments):
flatten, a fixed pixel permutation, an input layer with GELU, pre-LN residual FFN blocks with a
fixed 4x expansion, and a zero-initialised head."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "dense_init"]


def dense_init(linear: nn.Linear, zero: bool = False) -> None:
    """The paper's models' init of a dense layer: ``N(0, 1/fan_in)`` weight, zero bias;
    ``zero=True`` zeroes the weight too (μP's readout and residual-branch outputs start at 0)."""
    with torch.no_grad():
        if zero:
            linear.weight.zero_()
        else:
            linear.weight.normal_(0.0, linear.in_features**-0.5)
        if linear.bias is not None:
            linear.bias.zero_()


class FeedForward(nn.Module):
    """Pre-LN FFN ``fc2(GELU(fc1(LN(x))))``, ``width -> e*width -> width``; ``fc2`` zero-init.

    Shared by the MLP's residual blocks and the ViT."""

    def __init__(self, width: int, expansion: int = 4, bias: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, expansion * width, bias=bias)
        self.fc2 = nn.Linear(expansion * width, width, bias=bias)
        dense_init(self.fc1)
        dense_init(self.fc2, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class Block(FeedForward):
    """Pre-LN residual block ``x + fc2(GELU(fc1(LN(x))))`` with expansion ``e`` (4 in the paper)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class MLP(nn.Module):
    """Residual MLP: flatten, (fixed pixel permutation), input layer + GELU, ``depth`` pre-LN
    blocks, zero-initialised linear head.

    Args:
        in_features: flattened input size (3072 for 32x32 RGB).
        num_classes: output size.
        width: residual width ``w``; the main knob. Blocks expand to ``expansion * w``.
        depth: number of residual blocks (3 for the paper's scaling laws, 2 for its μP checks).
        shuffle_pixels: apply a fixed random permutation (seed 42) to the flattened input, as the
            paper does to remove any spatial prior.
        bias: learn biases in the linear layers.

    Module names: ``input_layer``, ``blocks.{i}.fc1``, ``blocks.{i}.fc2``, ``head``.
    """

    def __init__(
        self,
        in_features: int = 3072,
        num_classes: int = 10,
        width: int = 64,
        depth: int = 3,
        *,
        expansion: int = 4,
        shuffle_pixels: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        if shuffle_pixels:
            perm = torch.from_numpy(np.random.default_rng(42).permutation(in_features))
        else:
            perm = torch.arange(in_features)
        self.register_buffer("perm", perm, persistent=False)
        self.shuffle_pixels = shuffle_pixels
        self.input_layer = nn.Linear(in_features, width, bias=bias)
        self.blocks = nn.ModuleList(Block(width, expansion, bias) for _ in range(depth))
        self.head = nn.Linear(width, num_classes, bias=bias)
        dense_init(self.input_layer)
        dense_init(self.head, zero=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLP expects inputs with {self.in_features} features after flattening, "
                f"got {x.shape[1]}"
            )
        if self.shuffle_pixels:
            x = x.index_select(1, self.perm)  # ~3x faster than x[:, perm] on CPU
        x = F.gelu(self.input_layer(x))
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def get_output_embeddings(self) -> nn.Linear:
        """The readout (μP's zero-initialised head), as transformers models name it: surgery's
        ``all-linear`` keeps it dense and ``mup.prepare`` finds it here."""
        return self.head
