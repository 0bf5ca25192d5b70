"""Real clients: Hugging Face transformers models built from configs (no downloads)."""

import pytest
import torch

from structlin import mup
from structlin.layers import BTTLinear
from structlin.surgery import structurize

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")


def _gpt2(n_embd, meta=False):
    cfg = transformers.GPT2Config(
        n_embd=n_embd,
        n_layer=2,
        n_head=4,
        vocab_size=96,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    if meta:
        with torch.device("meta"):
            return transformers.GPT2LMHeadModel(cfg)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _vit(hidden, meta=False):
    cfg = transformers.ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        image_size=16,
        patch_size=8,
        num_labels=5,
    )
    if meta:
        with torch.device("meta"):
            return transformers.ViTForImageClassification(cfg)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(cfg)


def _train(model, groups, batch, loss_fn, steps=20):
    opt = torch.optim.AdamW(groups)
    losses = []
    model.train()
    for _ in range(steps):
        loss = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_gpt2_conv1d_structured_with_mup_trains():
    model = _gpt2(64)
    report = structurize(model, "btt", rank=2)
    assert "lm_head" not in report.replaced
    assert len(report.replaced) == 8  # c_attn, attn c_proj, c_fc, mlp c_proj per block
    assert isinstance(model.transformer.h[0].mlp.c_fc, BTTLinear)
    base = _gpt2(32, meta=True)
    groups = mup.param_groups(model, 3e-3, base=base, optimizer="adamw")
    m = {n: g["lr_mult"] for g in groups for n in g["names"]}
    fc = model.transformer.h[0].mlp.c_fc  # 64 -> 256, base 32 -> 128
    for f in fc.factors():
        assert m[f"transformer.h.0.mlp.c_fc.{f.name}"] == pytest.approx(32 / (2 * f.fan_in))
    assert m["lm_head.weight"] == pytest.approx(32 / 64)
    assert m["transformer.wte.weight"] == 1.0 and m["transformer.ln_f.weight"] == 1.0
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = _train(model, groups, ids, lambda mdl, b: mdl(b, labels=b).loss)
    assert losses[-1] < 0.7 * losses[0]


def test_vit_structured_with_mup_trains():
    model = _vit(64)
    report = structurize(model, "btt")
    assert "classifier" not in report.replaced and len(report.replaced) == 12
    base = _vit(32, meta=True)
    groups = mup.param_groups(model, 1e-3, base=base, optimizer="adamw")
    m = {n: g["lr_mult"] for g in groups for n in g["names"]}
    # the query projection is called q_proj (transformers 5) or query (4.x)
    name, q = next(
        (n, mod) for n, mod in model.named_modules() if n.endswith(("q_proj", "attention.query"))
    )
    assert isinstance(q, BTTLinear)
    for f in q.factors():
        assert m[f"{name}.{f.name}"] == pytest.approx(32 / (2 * f.fan_in))
    assert m["classifier.weight"] == pytest.approx(0.5)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(8, 3, 16, 16, generator=gen)
    labels = torch.randint(0, 5, (8,), generator=gen)
    losses = _train(
        model, groups, (pixels, labels), lambda mdl, b: mdl(pixel_values=b[0], labels=b[1]).loss
    )
    assert losses[-1] < 0.5 * losses[0]
