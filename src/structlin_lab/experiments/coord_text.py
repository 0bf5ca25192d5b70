"""Coordinate check of a Hugging Face causal language model on a text file.

The text is tokenised by character; the model is ``transformers.AutoModelForCausalLM`` built from
a tiny local config of a model type (``"gpt2"``, ``"llama"``, ...; nothing is downloaded) with
``n_layer`` blocks, width ``d``, heads of fixed size ``d_head`` (so ``d // d_head`` heads: the
``1/sqrt(d_head)`` attention scale stays constant, as μP needs), an MLP of ``4d`` and an untied
head. Each model is structured with :func:`structlin.structurize` and initialised with
:func:`structlin.mup.prepare`; ``Δh`` is measured on the output of the last block, as in the
CIFAR-10 check (Qiu et al., ICML 2024, §3 and Figure 2a). That is the right point for pre-LN
models (GPT-2, Llama and most causal LMs); for a post-LN model measure a residual-branch output
instead (docs/coord_check.md explains why).

The default widths are squares that are multiples of 16 (:data:`DEFAULT_TEXT_WIDTHS`): BTT then
splits every width, and the MLP's ``4d``, into the same balanced shape. At ``2^odd`` widths
(128, 512) its rank-1 factors contract (``16 -> 8``), so the layer's output RMS is ``1/sqrt(2)``
of that at the neighbouring square widths, and a fit over 64, 128, 256, 512 sees that zigzag as
a slope.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from structlin import structurize
from structlin.coord import coord_check, fit_slopes, plot_coord_check, save_csv
from structlin.io import atomic_write_text
from structlin.mup import prepare

from ..data import get_batch

__all__ = [
    "DEFAULT_TEXT_STRUCTURES",
    "DEFAULT_TEXT_WIDTHS",
    "hf_causal_lm_factory",
    "run_coord_check_text",
]

DEFAULT_TEXT_STRUCTURES = ("dense", "btt")
#: 8², 12², 16², 20²: one BTT factorisation shape at every width (see the module docstring).
DEFAULT_TEXT_WIDTHS = (64, 144, 256, 400)


def _hf_config(model_type: str, width: int, vocab_size: int, n_layer: int, d_head: int, seq: int):
    import transformers

    if width % d_head:
        raise ValueError(f"width {width} is not a multiple of d_head={d_head}")
    cfg = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=n_layer,
        num_attention_heads=width // d_head,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    extra = {"intermediate_size": 4 * width, "n_inner": 4 * width, "head_dim": d_head}
    extra.update({k: 0.0 for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout")})
    extra.update({k: None for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    extra["num_key_value_heads"] = width // d_head
    for key, value in extra.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    return cfg


def hf_causal_lm_factory(
    model_type: str,
    structure: str,
    *,
    vocab_size: int,
    n_layer: int = 2,
    d_head: int = 16,
    seq: int = 64,
) -> Callable[[int], nn.Module]:
    """``width -> model``: a tiny ``model_type`` causal LM, structured, then μP-prepared."""
    import transformers

    def make(width: int) -> nn.Module:
        cfg = _hf_config(model_type, width, vocab_size, n_layer, d_head, seq)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' notes on tiny configs
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        if structure != "dense":
            structurize(model, structure)
        prepare(model)
        return model

    return make


def _last_block(model: nn.Module) -> str:
    """The name of the last element of the model's longest ``nn.ModuleList`` (its blocks)."""
    lists = [(len(m), n) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to measure")
    length, name = max(lists)
    return f"{name}.{length - 1}"


def _lm_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


def run_coord_check_text(
    tokens: np.ndarray,
    vocab_size: int,
    *,
    model_type: str = "gpt2",
    structures: Sequence[str] = DEFAULT_TEXT_STRUCTURES,
    widths: Sequence[int] = DEFAULT_TEXT_WIDTHS,
    steps: int = 10,
    batch_size: int = 8,
    block_size: int = 64,
    lr: float = 3e-3,
    n_layer: int = 2,
    d_head: int = 16,
    seed: int = 0,
    out_dir: str | Path | None = None,
    log=print,
) -> dict[str, Any]:
    """Run the check for every structure and LR rule; returns ``{"records", "fits", "layer"}``.

    ``tokens`` is a 1-D array of character ids below ``vocab_size``. The base width is the
    smallest width. With ``out_dir``, writes ``records.csv``, ``fits.json`` and, when matplotlib
    is installed, ``coord_check.{png,pdf}``.
    """
    tokens = np.asarray(tokens)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield get_batch(tokens, batch_size, block_size, gen)

    def make(structure: str):
        return hf_causal_lm_factory(
            model_type, structure, vocab_size=vocab_size, n_layer=n_layer, d_head=d_head,
            seq=block_size,
        )  # fmt: skip

    with torch.device("meta"):
        layer = _last_block(make("dense")(min(widths)))
    records: list[dict[str, Any]] = []
    for structure in structures:
        rules = ("structure-aware",) if structure == "dense" else ("structure-aware", "dense")
        for rule in rules:
            log(f"coord check {model_type}: {structure} lr_rule={rule} widths={list(widths)}")
            recs = coord_check(
                make(structure), widths, batches, base_width=min(widths), lr=lr, steps=steps,
                lr_rule=rule, loss_fn=_lm_loss, record=[layer], seed=seed,
                label={"structure": structure, "lr_rule": rule},
            )  # fmt: skip
            if structure == "dense":  # both rules coincide for dense layers
                recs += [{**r, "lr_rule": "dense"} for r in recs]
            records += recs
    # Step 1 moves only the zero-initialised readout: fit from step 2 on.
    fits = fit_slopes(records, layer=layer, first_step=2)
    for f in fits:
        log(f"  {f['structure']:<20} {f['lr_rule']:<16} slope {f['slope']:+.3f}")
    if out_dir is not None:
        _save(records, fits, Path(out_dir), f"{model_type} ({n_layer} blocks)", layer, log)
    return {"records": records, "fits": fits, "layer": layer}


def _save(records: list[dict], fits: list[dict], out: Path, what: str, layer: str, log) -> None:
    """``records.csv``, ``fits.json`` and (with matplotlib) ``coord_check.{png,pdf}``."""
    save_csv(records, out / "records.csv")
    atomic_write_text(out / "fits.json", json.dumps(fits, indent=2))
    try:
        plot_coord_check(fits, out / "coord_check", title=f"{what}: Δh of {layer} vs width")
    except ImportError as err:
        log(f"no plot: {err}")
