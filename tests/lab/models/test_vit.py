import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from structlin import mup
from structlin.layers import BTTLinear
from structlin.surgery import structurize
from structlin_lab.models import ViT
from structlin_lab.models.vit import Attention, _patchify


def small_vit(width=32, depth=2, **kw):
    torch.manual_seed(0)
    kw.setdefault("heads", 4)
    return ViT(10, width, depth, **kw)


def randomize_(model, std=0.3):
    # Zero-initialised layers hide attention entirely at init; give every weight a value.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def images(b=4, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_cifar_geometry_and_shapes():
    model = small_vit()
    assert model.num_patches == 16 and model.num_tokens == 17
    assert model.pos_embed.shape == (1, 17, 32) and model.cls_token.shape == (1, 1, 32)
    assert model.patch_embed.proj.in_features == 8 * 8 * 3
    x = images()
    assert model.tokens(x).shape == (4, 17, 32)
    assert model.features(x).shape == (4, 32)
    assert model(x).shape == (4, 10)
    assert model.blocks[0].attn.dim_head == 8 and model.blocks[0].ffn.fc1.out_features == 128


def test_imagenet_vit32_geometry():
    torch.manual_seed(0)
    model = ViT(7, 16, 1, heads=4, image_size=224, patch_size=32)
    x = torch.randn(2, 3, 224, 224)
    assert model.num_tokens == 50
    assert model.tokens(x).shape == (2, 50, 16)
    assert model(x).shape == (2, 7)


def test_mean_pool_has_no_cls_token():
    model = randomize_(small_vit(pool="mean"))
    assert model.cls_token is None and model.num_tokens == 16
    x = images(2)
    assert torch.allclose(model.features(x), model.tokens(x).mean(1))


def test_explicit_dim_head_and_names():
    model = small_vit(width=24, heads=2, dim_head=16, ffn_expansion=2)
    attn = model.blocks[1].attn
    assert attn.to_q.out_features == 32 and attn.to_out.in_features == 32
    assert model.blocks[1].ffn.fc1.out_features == 48
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears[:2] == ["patch_embed.proj", "blocks.0.attn.to_q"]
    assert linears[-1] == "head"
    assert {"blocks.1.attn.to_k", "blocks.1.attn.to_v", "blocks.1.ffn.fc2"} <= set(linears)
    for qkv in ("to_q", "to_k", "to_v"):
        assert getattr(attn, qkv).bias is None
    assert attn.to_out.bias is not None
    assert model(images(2)).shape == (2, 10)


def test_patches_are_contiguous_image_blocks():
    x = torch.zeros(1, 3, 32, 32)
    x[0, :, 8:16, 24:32] = 1.0  # row 1, column 3 of the 4x4 patch grid
    p = _patchify(x, 8)
    assert p.shape == (1, 16, 192)
    assert torch.nonzero(p.sum(-1)).flatten().tolist() == [0, 1 * 4 + 3]
    assert bool((p[0, 7] == 1).all())


def test_zero_init_and_initial_loss_is_log_num_classes():
    model = small_vit(width=64)
    zero = ["head"]
    for i in range(2):
        zero += [f"blocks.{i}.attn.to_q", f"blocks.{i}.attn.to_out", f"blocks.{i}.ffn.fc2"]
    for name in zero:
        assert bool((model.get_submodule(name).weight == 0).all()), name
    for name in ["blocks.0.ffn.fc1", "blocks.1.attn.to_k", "patch_embed.proj"]:
        w = model.get_submodule(name).weight
        assert w.std().item() == pytest.approx(w.shape[1] ** -0.5, rel=0.1), name
    x = images(8)
    logits = model(x)
    assert torch.equal(logits, model.head.bias.expand(8, -1))
    assert torch.equal(logits, torch.zeros_like(logits))
    loss = F.cross_entropy(logits, torch.arange(8))
    assert loss.item() == pytest.approx(math.log(10), rel=1e-6)


def _reference_attention(attn: Attention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    b, n, _ = x.shape
    h = attn.norm(x)

    def heads(t):
        return t.view(b, n, attn.heads, attn.dim_head).transpose(1, 2)

    q = attn.q_norm(heads(attn.to_q(h)))
    k = attn.k_norm(heads(attn.to_k(h)))
    v = heads(attn.to_v(h))
    logits = q @ k.transpose(-1, -2) * (8.0 / attn.dim_head)
    if causal:
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(mask, float("-inf"))
    out = logits.softmax(-1) @ v
    return attn.to_out(out.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_explicit_softmax_with_mup_scale(causal):
    torch.manual_seed(0)
    attn = randomize_(Attention(24, heads=2, dim_head=16, causal=causal))
    assert attn.scale == 0.5
    x = torch.randn(3, 7, 24)
    assert torch.allclose(attn(x), _reference_attention(attn, x, causal), atol=1e-5)


def test_causal_flag_masks_future_patches():
    x = images(2)
    x2 = x.clone()
    x2[:, :, 24:, 24:] = torch.randn(2, 3, 8, 8)  # the last patch only
    for causal in (False, True):
        model = randomize_(small_vit(causal=causal)).eval()
        t1, t2 = model.tokens(x), model.tokens(x2)
        assert not torch.allclose(t1[:, -1], t2[:, -1])
        if causal:
            assert torch.allclose(t1[:, :-1], t2[:, :-1], atol=1e-6)
        else:
            assert not torch.allclose(t1[:, 0], t2[:, 0], atol=1e-4)


def test_loss_decreases_with_adam():
    model = small_vit()
    x, y = images(16), torch.arange(16) % 10
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(10))
    assert losses[-1] < 0.85 * losses[0]


def test_structurize_keeps_head_dense_and_runs():
    model = small_vit(width=64)
    report = structurize(model, "btt")
    assert type(model.head) is nn.Linear
    assert [r.status for r in report if r.name == "head"] == ["kept (head)"]
    assert isinstance(model.blocks[0].attn.to_q, BTTLinear)
    assert isinstance(model.patch_embed.proj, BTTLinear)
    assert len(report.replaced) == 1 + 2 * 6
    x = images(2)
    assert torch.equal(model(x), torch.zeros(2, 10))  # zero-init layers stay zero
    model(x).sum().backward()
    assert model.head.weight.grad is not None


def test_mup_param_groups_against_meta_base():
    with torch.device("meta"):
        base = ViT(10, 32, 2, heads=4)
    model = small_vit(width=128)
    groups = mup.param_groups(model, 1e-3, base=base)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    mult = {n: g["lr_mult"] for g in groups for n in g["names"]}
    for name in [
        "blocks.0.attn.to_q.weight",
        "blocks.0.attn.to_k.weight",
        "blocks.1.attn.to_out.weight",
        "blocks.1.ffn.fc1.weight",
        "blocks.1.ffn.fc2.weight",
        "head.weight",
    ]:
        assert mult[name] == pytest.approx(32 / 128), name
    fixed = ["patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.q_norm.weight"]
    for name in fixed:
        assert mult[name] == 1.0, name
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_mult"])
    structurize(model, "btt")
    s_mult = {i.name: i.lr_mult for i in mup.param_info(model, base=base)}
    assert "blocks.0.ffn.fc1.weights.0" in s_mult and s_mult["head.weight"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pool": "max"}, "pool"),
        ({"image_size": 30}, "multiple of patch_size"),
        ({"heads": 5}, "not divisible by heads"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViT(10, 32, 1, **kwargs)


def test_wrong_input_shape_is_a_clear_error():
    model = small_vit()
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model(torch.randn(2, 3, 28, 28))
