"""The paper's GPT-2 language model (Qiu et al., ICML 2024: nanoGPT with split Q/K/V,
QK-LayerNorm and no weight tying).

A pre-LN decoder-only transformer in which every matrix is a plain ``nn.Linear`` (queries, keys
and values are three separate layers, the head is untied by default) so that
:func:`structlin.structurize` can replace each one on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from structlin import StructuredLinear, is_linear_like, linear_dims

from .mlp import dense_init
from .moe import MoEMLP

__all__ = ["GPT2", "GPTConfig"]

_EMBED_STD = 0.02
_MLPS = ("dense", "moe")


@dataclass
class GPTConfig:
    """Hyper-parameters of :class:`GPT2`.

    Attributes:
        vocab_size: number of token ids (50257 for the GPT-2 BPE; the paper pads to 50304).
        block_size: maximum sequence length (learned position embeddings).
        n_layer: number of blocks.
        d_model: residual width; the μP width knob.
        n_head: attention heads. ``None`` (default) means ``d_model // d_head``, so heads are
            added as width grows at fixed ``d_head``. When given, it is used together with
            ``d_head`` as is: the attention width ``n_head * d_head`` may differ from ``d_model``
            (the paper's BTT runs use ``n_head=6, d_head=64`` at ``d_model`` 1024-2048).
        d_head: per-head size (64). ``None`` means ``d_model // n_head`` (needs ``n_head``).
        ffn_expansion: MLP hidden size is ``ffn_expansion * d_model``.
        qk_ln: per-head LayerNorm on queries and keys (the paper trains with it on).
        bias: biases in the linear layers and LayerNorms (the paper trains without).
        tie_embeddings: share ``lm_head.weight`` with ``wte.weight``. Off by default, as in the
            paper; when tied, the head is not zero-initialised and cannot be structured.
        dropout: dropout on the embeddings, attention probabilities and residual branches.
        mlp: ``"dense"`` (the FFN ``d -> ffn_expansion*d -> d``) or ``"moe"``: a mixture of
            ``n_experts`` such FFNs with top-``top_k`` routing (:class:`MoEMLP`, the dense-expert
            baseline of BTT-MoE), whose auxiliary loss the trainer collects with
            ``structlin.aux.collect_aux``.
        n_experts, top_k: ``E`` and ``k`` of ``mlp="moe"`` (8 and 2).
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    d_model: int = 768
    n_head: int | None = None
    d_head: int | None = 64
    ffn_expansion: int = 4
    qk_ln: bool = True
    bias: bool = False
    tie_embeddings: bool = False
    dropout: float = 0.0
    mlp: str = "dense"
    n_experts: int = 8
    top_k: int = 2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "d_model", "ffn_expansion"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.mlp not in _MLPS:
            raise ValueError(f"GPTConfig.mlp must be one of {_MLPS}, got {self.mlp!r}")
        for name in ("n_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.top_k > self.n_experts:
            raise ValueError(
                f"GPTConfig.top_k ({self.top_k}) must be at most n_experts ({self.n_experts})"
            )
        self.heads()  # validates the head geometry early

    def heads(self) -> tuple[int, int]:
        """The resolved ``(n_head, d_head)``; the config itself keeps what was passed, so that
        ``dataclasses.replace(config, d_model=...)`` re-derives the head count."""
        n_head, d_head = self.n_head, self.d_head
        if n_head is None and d_head is None:
            raise ValueError("GPTConfig: set n_head, d_head or both")
        if n_head is None:
            if d_head < 1 or self.d_model % d_head != 0:
                raise ValueError(
                    f"GPTConfig: d_model {self.d_model} is not divisible by d_head {d_head}; "
                    f"choose another d_head or pass n_head explicitly"
                )
            n_head = self.d_model // d_head
        elif d_head is None:
            if n_head < 1 or self.d_model % n_head != 0:
                raise ValueError(
                    f"GPTConfig: d_model {self.d_model} is not divisible by n_head {n_head}"
                )
            d_head = self.d_model // n_head
        if n_head < 1 or d_head < 1:
            raise ValueError(f"GPTConfig: n_head and d_head must be >= 1, got {n_head}, {d_head}")
        return n_head, d_head


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with separate ``q``, ``k``, ``v`` projections, optional per-head
    QK-LayerNorm and the μP logit scale ``8 / d_head`` (``1/sqrt(64)`` at ``d_head = 64``).

    ``(B, T, d_model) -> (B, T, d_model)`` through an attention width ``n_head * d_head``;
    ``c_proj`` starts at zero so the block starts as the identity.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.d_head = config.heads()
        d_attn = self.n_head * self.d_head
        self.scale = 8.0 / self.d_head
        self.dropout = config.dropout
        self.q = nn.Linear(config.d_model, d_attn, bias=config.bias)
        self.k = nn.Linear(config.d_model, d_attn, bias=config.bias)
        self.v = nn.Linear(config.d_model, d_attn, bias=config.bias)
        if config.qk_ln:
            self.q_ln = nn.LayerNorm(self.d_head, bias=config.bias)
            self.k_ln = nn.LayerNorm(self.d_head, bias=config.bias)
        else:
            self.q_ln = self.k_ln = None
        self.c_proj = nn.Linear(d_attn, config.d_model, bias=config.bias)
        for layer in (self.q, self.k, self.v):
            dense_init(layer)
        dense_init(self.c_proj, zero=True)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.n_head, self.d_head).transpose(1, 2)  # (B, H, T, Dh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        if self.q_ln is not None:
            q, k = self.q_ln(q), self.k_ln(k)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
            scale=self.scale,
        )
        b, _, t, _ = y.shape
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.d_head)
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLPBlock(nn.Module):
    """``mlp_proj(GELU(c_fc(x)))``, ``d -> e*d -> d``; ``mlp_proj`` starts at zero."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.ffn_expansion * config.d_model
        self.dropout = config.dropout
        self.c_fc = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.mlp_proj = nn.Linear(hidden, config.d_model, bias=config.bias)
        dense_init(self.c_fc)
        dense_init(self.mlp_proj, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.mlp_proj(F.gelu(self.c_fc(x))), self.dropout, self.training)


def _mlp(config: GPTConfig) -> nn.Module:
    if config.mlp == "dense":
        return MLPBlock(config)
    hidden = config.ffn_expansion * config.d_model
    return MoEMLP(
        config.d_model,
        hidden,
        config.n_experts,
        config.top_k,
        bias=config.bias,
        dropout=config.dropout,
    )


class Block(nn.Module):
    """``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``; ``(B, T, d) -> (B, T, d)``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = _mlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2: token + position embeddings, ``n_layer`` pre-LN causal blocks, ``ln_f``, ``lm_head``.

    ``forward(idx (B, T) int, targets (B, T) int | None) -> (logits (B, T, vocab), loss | None)``.

    Initialisation (μP, as in the paper's models): ``wte``/``wpe`` ``N(0, 0.02)``; every
    linear ``N(0, 1/fan_in)`` with zero bias, except ``attn.c_proj``, ``mlp.mlp_proj`` and the
    untied ``lm_head``, which start at zero (so the initial logits are exactly zero and the
    initial loss is ``log(vocab_size)``).

    Names: ``wte``, ``wpe``, ``blocks.{i}.{ln_1, ln_2}``, ``blocks.{i}.attn.{q, k, v, q_ln, k_ln,
    c_proj}``, ``blocks.{i}.mlp.{c_fc, mlp_proj}``, ``ln_f``, ``lm_head``; with ``mlp="moe"``,
    ``blocks.{i}.mlp.router`` and ``blocks.{i}.mlp.experts.{e}.{c_fc, mlp_proj}``.

    :func:`structlin.structurize` keeps ``lm_head`` dense by default (it is
    :meth:`get_output_embeddings`); the paper also structures it (``--layers=all``), which is
    ``structurize(model, "btt", overrides={"lm_head": "btt"})``.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT2 expects a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.n_head, self.d_head = config.heads()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        with torch.no_grad():
            self.wte.weight.normal_(0.0, _EMBED_STD)
            self.wpe.weight.normal_(0.0, _EMBED_STD)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        else:
            dense_init(self.lm_head, zero=True)

    def get_output_embeddings(self) -> nn.Module:
        """The output head (the name transformers and :func:`structlin.structurize` look for)."""
        return self.lm_head

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"GPT2: idx must be an integer tensor of token ids, got {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"GPT2: idx must have shape (B, T), got {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(
                f"GPT2: sequence length {t} exceeds block_size {self.config.block_size}"
            )
        pos = torch.arange(t, device=idx.device)
        x = F.dropout(self.wte(idx) + self.wpe(pos), self.config.dropout, self.training)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1),
                ignore_index=-1,
            )
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Learnable scalars, each shared tensor counted once.

        ``non_embedding=True`` leaves out the vocabulary/position matrices: ``wte``, ``wpe`` and
        ``lm_head`` (Kaplan et al.'s ``N``; with the untied head, the head matrix is a
        vocabulary matrix too, matching the paper's "non-embedding compute" that excludes it),
        also after the head has been structured.
        """
        skip: set[int] = set()
        if non_embedding:
            vocab = (self.wte, self.wpe, self.lm_head)
            skip = {id(p) for m in vocab for p in m.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def macs_per_token(self, non_embedding: bool = False) -> int:
        """Forward multiply-accumulates (MACs) per token at full context.

        Convention (that of the paper's fvcore counts divided by ``block_size``):

        * every linear-like layer, ``lm_head`` included: its ``macs()`` if it is a
          :class:`~structlin.layers.StructuredLinear`, else ``in_features * out_features``
          (biases, norms, GELU, softmax and embedding lookups are not counted);
        * attention: per layer ``block_size * d_attn`` MACs for ``q k^T`` plus the same for
          ``attn @ v`` with ``d_attn = n_head * d_head``, i.e. ``2 * n_layer * block_size *
          d_attn`` in all. Every query is charged the full ``block_size`` keys: the causal
          mask is not discounted.

        * a mixture-of-experts FFN (``mlp="moe"``): its active experts and router only,
          :meth:`MoEMLP.macs_per_token`.

        ``non_embedding=True`` leaves out ``lm_head`` (the paper's ``non_emb_compute``).
        """
        moes = [m for m in self.modules() if isinstance(m, MoEMLP)]
        in_moe = {id(sub) for moe in moes for sub in moe.modules()}
        total = sum(moe.macs_per_token() for moe in moes)
        for name, module in self.named_modules():
            if not name or not is_linear_like(module) or id(module) in in_moe:
                continue
            if non_embedding and module is self.lm_head:
                continue
            if isinstance(module, StructuredLinear):
                total += module.macs()
            else:
                d_in, d_out = linear_dims(module)
                total += d_in * d_out
        d_attn = self.n_head * self.d_head
        return total + 2 * self.config.n_layer * self.config.block_size * d_attn
