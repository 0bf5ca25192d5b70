import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from structlin import mup
from structlin.layers import BTTLinear
from structlin.surgery import structurize
from structlin_lab.models import GPT2, GPTConfig
from structlin_lab.models.gpt2 import CausalSelfAttention

V, T = 100, 16


def tiny_config(**kw):
    base = dict(vocab_size=V, block_size=T, n_layer=2, d_model=64, d_head=16)
    return GPTConfig(**{**base, **kw})


def tiny(**kw):
    torch.manual_seed(0)
    return GPT2(tiny_config(**kw))


def randomize_(model, std=0.3):
    # Zero-initialised projections hide attention entirely at init; give every weight a value.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def tokens(b=2, t=T, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def test_head_geometry():
    assert tiny_config().heads() == (4, 16)
    assert GPTConfig().heads() == (12, 64)
    assert tiny_config(n_head=2, d_head=None).heads() == (2, 32)
    # both given: used as is, the attention width may differ from d_model (paper's BTT runs)
    model = tiny(n_head=2, d_head=24)
    attn = model.blocks[0].attn
    assert attn.q.out_features == 48 and attn.c_proj.in_features == 48
    assert model(tokens())[0].shape == (2, T, V)
    # the config keeps what was passed, so replace() re-derives the head count
    assert dataclasses.replace(tiny_config(), d_model=128).heads() == (8, 16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 60}, "not divisible by d_head"),
        ({"n_head": 5, "d_head": None}, "not divisible by n_head"),
        ({"n_head": None, "d_head": None}, "set n_head, d_head"),
        ({"n_layer": 0}, "n_layer"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)


def test_shapes_and_names():
    model = tiny()
    logits, loss = model(tokens(3, 10))
    assert logits.shape == (3, 10, V) and loss is None
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = {"lm_head"} | {
        f"blocks.{i}.{s}"
        for i in range(2)
        for s in ("attn.q", "attn.k", "attn.v", "attn.c_proj", "mlp.c_fc", "mlp.mlp_proj")
    }
    assert names == expected
    assert model.get_output_embeddings() is model.lm_head
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    assert model.blocks[0].attn.q_ln.normalized_shape == (16,)
    with_bias = tiny(bias=True)
    assert with_bias.blocks[0].mlp.c_fc.bias is not None and with_bias.ln_f.bias is not None
    assert with_bias.lm_head.bias is None


def test_init_zero_modules_and_initial_loss_is_log_vocab():
    model = tiny()
    outs = ("attn.c_proj", "mlp.mlp_proj")
    zero = ["lm_head"] + [f"blocks.{i}.{s}" for i in range(2) for s in outs]
    for name in zero:
        assert bool((model.get_submodule(name).weight == 0).all()), name
    for name in ["blocks.0.attn.q", "blocks.1.attn.k", "blocks.0.mlp.c_fc"]:
        w = model.get_submodule(name).weight
        assert w.std().item() == pytest.approx(64**-0.5, rel=0.1), name
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.wpe.weight.std().item() == pytest.approx(0.02, rel=0.2)
    idx = tokens()
    logits, loss = model(idx, idx)
    assert torch.equal(logits, torch.zeros_like(logits))
    assert loss.item() == pytest.approx(math.log(V), rel=1e-6)


def test_causal_future_tokens_do_not_change_past_logits():
    model = randomize_(tiny()).eval()
    idx = tokens(2)
    idx2 = idx.clone()
    idx2[:, 9] = (idx[:, 9] + 1) % V
    a, _ = model(idx)
    b, _ = model(idx2)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-5)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)


@pytest.mark.parametrize("qk_ln", [True, False])
def test_attention_matches_explicit_softmax_with_mup_scale(qk_ln):
    torch.manual_seed(0)
    attn = randomize_(CausalSelfAttention(tiny_config(qk_ln=qk_ln, d_head=32)))
    assert attn.scale == 0.25 and (attn.q_ln is None) == (not qk_ln)
    x = torch.randn(2, 5, 64)

    def heads(t):
        return t.view(2, 5, 2, 32).transpose(1, 2)

    q, k, v = heads(attn.q(x)), heads(attn.k(x)), heads(attn.v(x))
    if qk_ln:
        q, k = attn.q_ln(q), attn.k_ln(k)
    logits = (q @ k.transpose(-1, -2)) * 8 / 32
    logits = logits.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.c_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 64))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_loss_ignores_index_minus_one():
    model = randomize_(tiny(), std=0.1)
    idx = tokens()
    targets = tokens(seed=1)
    targets[:, :5] = -1
    logits, loss = model(idx, targets)
    ref = F.cross_entropy(logits[:, 5:].reshape(-1, V), targets[:, 5:].reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_input_errors():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(tokens(1, T + 1))
    with pytest.raises(ValueError, match="integer"):
        model(tokens().float())
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(tokens()[0])
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT2({"d_model": 64})


def test_loss_decreases_with_adam():
    model = tiny()
    idx = tokens(4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(V))
    assert losses[-1] < 0.85 * losses[0]


def test_dropout_only_in_training():
    model = randomize_(tiny(dropout=0.5), std=0.1)
    idx = tokens()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_tied_embeddings():
    model = tiny(tie_embeddings=True)
    untied = tiny()
    assert model.lm_head.weight is model.wte.weight
    assert model.wte.weight.abs().sum() > 0  # the shared matrix keeps its embedding init
    assert model.num_params(non_embedding=False) == untied.num_params(non_embedding=False) - V * 64
    assert model.num_params() == untied.num_params()
    report = structurize(model, "btt")
    assert "lm_head" not in report.replaced and model.lm_head.weight is model.wte.weight
    assert model(tokens())[0].shape == (2, T, V)


def test_num_params():
    model = tiny()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 2 * V * 64 - T * 64
    per_layer = 4 * 64 * 64 + 2 * 64 * 256 + 2 * 64 + 2 * 16  # linears, ln_1/2, q_ln/k_ln
    assert model.num_params() == 2 * per_layer + 64


def test_macs_per_token_counts_linears_and_attention():
    model = tiny()
    d, e, L = 64, 4, 2
    linears = L * (4 * d * d + 2 * d * e * d) + d * V
    attention = L * (T * d + T * d)  # q k^T and attn @ v, every query sees all T keys
    assert model.macs_per_token() == linears + attention
    assert model.macs_per_token(non_embedding=True) == linears + attention - d * V
    # attention width n_head * d_head, not d_model, sets the attention cost
    narrow = tiny(n_head=1, d_head=16)
    assert narrow.macs_per_token() == L * (3 * d * 16 + 16 * d + 2 * d * e * d + 2 * T * 16) + d * V


def test_structurize_btt_keeps_lm_head_and_reduces_macs():
    model = tiny()
    before = model.macs_per_token()
    report = structurize(model, "btt")
    assert type(model.lm_head) is nn.Linear
    assert [r.status for r in report if r.name == "lm_head"] == ["kept (head)"]
    assert isinstance(model.blocks[0].attn.q, BTTLinear)
    assert len(report.replaced) == 12
    t = report.totals()
    after = model.macs_per_token()
    assert after < before
    assert before - after == t["macs_before"] - t["macs_after"]
    logits, loss = model(tokens(), tokens(seed=1))
    assert torch.equal(logits, torch.zeros_like(logits))
    loss.backward()
    # the paper also structures the head
    structurize(model, "btt", overrides={"lm_head": "btt"})
    assert isinstance(model.lm_head, BTTLinear) and model.macs_per_token() < after
    assert model.num_params() == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith(("wte", "wpe", "lm_"))
    )


def test_mup_param_groups_against_meta_base():
    with torch.device("meta"):
        base = GPT2(tiny_config(d_model=32))
    model = tiny(d_model=128)
    groups = mup.param_groups(model, 1e-3, base=base)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    mult = {n: g["lr_mult"] for g in groups for n in g["names"]}
    for name in [
        "blocks.0.attn.q.weight",
        "blocks.0.attn.v.weight",
        "blocks.1.attn.c_proj.weight",
        "blocks.1.mlp.c_fc.weight",
        "blocks.1.mlp.mlp_proj.weight",
        "lm_head.weight",
    ]:
        assert mult[name] == pytest.approx(32 / 128), name
    for name in ["wte.weight", "wpe.weight", "ln_f.weight", "blocks.0.attn.q_ln.weight"]:
        assert mult[name] == 1.0, name
    structurize(model, "btt")
    s_mult = {i.name: i.lr_mult for i in mup.param_info(model, base=base)}
    assert "blocks.0.mlp.c_fc.weights.1" in s_mult
    assert s_mult["lm_head.weight"] == pytest.approx(0.25)
