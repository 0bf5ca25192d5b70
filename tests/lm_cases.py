"""One tiny character-level GPT-2 training config that the lab's language-model tests share.

``tiny_lm_config(tmp, *overrides, repeats=100)`` writes a short repetitive text under ``tmp``
and returns a config that trains a 1-layer, width-32 GPT-2 on it for 20 steps in about a
second; ``overrides`` (``key=value``) come last and win.
"""

from __future__ import annotations

from pathlib import Path

TEXT = "the quick brown fox jumps over the lazy dog. "


def tiny_lm_config(tmp: Path, *extra: str, repeats: int = 100):
    from structlin_lab.train import load_config

    text = tmp / "t.txt"
    text.write_text(TEXT * repeats)
    return load_config(
        None,
        [
            "task=lm",
            "model.name=gpt2",
            "model.width=32",
            "model.base_width=16",
            "model.depth=1",
            "model.kwargs={d_head: 8}",
            f"data.source={text}",
            f"data.root={tmp / 'cache'}",
            "data.tokenizer=char",
            "data.block_size=16",
            "data.batch_size=8",
            "data.eval_batches=1",
            "train.steps=20",
            "train.eval_every=20",
            "train.progress=false",
            "optim.name=adamw",
            "optim.lr=1e-2",
            *extra,
        ],
    )
