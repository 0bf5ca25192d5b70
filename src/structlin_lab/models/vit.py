"""The paper's Vision Transformer (Qiu et al., ICML 2024: pre-LN blocks, separate Q/K/V projections,
per-head QK-LayerNorm).

A pre-LN ViT in which every matrix is a plain ``nn.Linear`` (queries, keys and values are three
separate layers) so that :func:`structlin.structurize` can replace each one on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import FeedForward, dense_init

__all__ = ["ViT"]

_POOLS = ("cls", "mean")


def _patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, (H/p)(W/p), p*p*C)``, patches in row-major order, each flattened as
    ``(row, column, channel)``."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p_row, p_col, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class PatchEmbed(nn.Module):
    """Patches to tokens: ``LN(proj(LN(patches)))``, ``(B, C, H, W) -> (B, N, width)``.

    The norm on both sides makes the token scale independent of the pixel statistics and of the
    width, so the embedding needs no width-dependent multiplier.
    """

    def __init__(self, patch_size: int, in_channels: int, width: int, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        patch_dim = in_channels * patch_size * patch_size
        self.norm_in = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, width, bias=bias)
        self.norm_out = nn.LayerNorm(width)
        dense_init(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.proj(self.norm_in(_patchify(x, self.patch_size))))


class Attention(nn.Module):
    """Pre-LN multi-head self-attention with per-head QK-LayerNorm and the μP logit scale.

    ``(B, N, width) -> (B, N, width)``; the residual is added by the caller. Logits are
    ``LN(q) LN(k)^T * 8 / dim_head`` (μP's ``1/d_head``, equal to the usual ``1/sqrt(d_head)``
    at ``dim_head = 64``). ``to_q`` and ``to_out`` start at zero, as the paper does.
    """

    def __init__(
        self, width: int, heads: int, dim_head: int, *, bias: bool = True, causal: bool = False
    ) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.causal = causal
        self.scale = 8.0 / dim_head
        inner = heads * dim_head
        self.norm = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_k = nn.Linear(width, inner, bias=False)
        self.to_v = nn.Linear(width, inner, bias=False)
        self.q_norm = nn.LayerNorm(dim_head)
        self.k_norm = nn.LayerNorm(dim_head)
        self.to_out = nn.Linear(inner, width, bias=bias)
        dense_init(self.to_q, zero=True)
        dense_init(self.to_k)
        dense_init(self.to_v)
        dense_init(self.to_out, zero=True)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)  # (B, H, N, Dh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q = self.q_norm(self._split(self.to_q(h)))
        k = self.k_norm(self._split(self.to_k(h)))
        v = self._split(self.to_v(h))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.scale)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class Block(nn.Module):
    """``x + attn(x)``, then ``x + ffn(x)``; ``(B, N, width) -> (B, N, width)``."""

    def __init__(
        self,
        width: int,
        heads: int,
        dim_head: int,
        expansion: int,
        *,
        bias: bool = True,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.attn = Attention(width, heads, dim_head, bias=bias, causal=causal)
        self.ffn = FeedForward(width, expansion, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ffn(x)


class ViT(nn.Module):
    """Vision Transformer: patch embedding, cls token + learned positions, ``depth`` pre-LN
    blocks, final LN, pooling, zero-initialised linear head. ``(B, C, H, W) -> (B, num_classes)``.

    Args:
        num_classes: output size.
        width: residual width ``w``; the μP width knob. With ``dim_head=None`` the head count is
            fixed and ``dim_head = width // heads`` grows with width (the paper's CIFAR setup).
        depth: number of blocks (3 for the paper's CIFAR runs, 12 for ImageNet ViT/32).
        heads: attention heads (8 on CIFAR, 4 on ImageNet).
        dim_head: per-head size; ``None`` means ``width // heads`` (``width`` must be divisible).
        ffn_expansion: FFN hidden size is ``ffn_expansion * width``.
        image_size: input height and width (square images), a multiple of ``patch_size``.
        patch_size: 8 on 32x32 CIFAR (16 patches + cls = 17 tokens); ImageNet ViT/32 is
            ``image_size=224, patch_size=32`` (49 + 1 = 50 tokens).
        in_channels: input channels.
        pool: ``"cls"`` reads out the cls token; ``"mean"`` averages the patch tokens and the
            model has no cls token.
        bias: biases in the patch projection, attention output, FFN and head (queries, keys and
            values never have one).
        causal: causal attention mask over the token sequence (the paper exposes it for ViT).

    Initialisation (μP, as in the paper's models): every linear ``N(0, 1/fan_in)`` with zero
    bias, except ``to_q``, ``to_out``, ``ffn.fc2`` and ``head``, which start at zero; so the
    initial logits are exactly the head bias, zero. ``cls_token`` and ``pos_embed`` are
    ``N(0, 1)``, the same scale as the LayerNorm-ed patch tokens they join.

    Names: ``patch_embed.{norm_in, proj, norm_out}``, ``cls_token``, ``pos_embed``,
    ``blocks.{i}.attn.{norm, to_q, to_k, to_v, q_norm, k_norm, to_out}``,
    ``blocks.{i}.ffn.{norm, fc1, fc2}``, ``norm``, ``head``. ``head`` is the last linear layer, so
    :func:`structlin.structurize` keeps it dense by default.
    """

    def __init__(
        self,
        num_classes: int,
        width: int,
        depth: int,
        *,
        heads: int = 8,
        dim_head: int | None = None,
        ffn_expansion: int = 4,
        image_size: int = 32,
        patch_size: int = 8,
        in_channels: int = 3,
        pool: str = "cls",
        bias: bool = True,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if pool not in _POOLS:
            raise ValueError(f"ViT: pool must be one of {_POOLS}, got {pool!r}")
        if image_size % patch_size != 0:
            raise ValueError(
                f"ViT: image_size {image_size} must be a multiple of patch_size {patch_size}"
            )
        if dim_head is None:
            if width % heads != 0:
                raise ValueError(
                    f"ViT: width {width} is not divisible by heads {heads}; pass dim_head"
                )
            dim_head = width // heads
        self.num_classes = num_classes
        self.width = width
        self.image_size = image_size
        self.in_channels = in_channels
        self.pool = pool
        self.num_patches = (image_size // patch_size) ** 2
        self.num_tokens = self.num_patches + (pool == "cls")

        self.patch_embed = PatchEmbed(patch_size, in_channels, width, bias=bias)
        if pool == "cls":
            self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        else:
            self.register_parameter("cls_token", None)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, width))
        self.blocks = nn.ModuleList(
            Block(width, heads, dim_head, ffn_expansion, bias=bias, causal=causal)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes, bias=bias)
        dense_init(self.head, zero=True)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token sequence after the blocks and the final LN: ``(B, num_tokens, width)``."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"ViT expects images of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}"
            )
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features fed to the head: ``(B, width)``."""
        t = self.tokens(x)
        return t[:, 0] if self.pool == "cls" else t.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def get_output_embeddings(self) -> nn.Linear:
        """The readout (μP's zero-initialised head), as transformers models name it: surgery's
        ``all-linear`` keeps it dense and ``mup.prepare`` finds it here."""
        return self.head
