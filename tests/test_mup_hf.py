"""μP for Hugging Face models through :func:`structlin.mup.prepare`: the coordinate check.

Character-level toy language modelling, 2 blocks, widths 64-400 at a fixed head size of 16, Adam:
after ``prepare``, ``Δh`` is flat in width for dense layers and for BTT with the structure-aware
learning rates, while BTT with the dense ("naive") rule decays (Qiu et al., ICML 2024, Section 3
and Fig. 2a, here on models written for standard parametrisation).

Three choices make the check measure μP and not something else (docs/coord_check.md gives the
numbers):

* the tokens follow a fixed random Markov chain, so there is something to learn: on uniform random
  tokens the hidden layers' gradients are mostly per-token noise and even dense layers decay;
* the widths are squares (8², 12², 16², 20², MLP 4d = 16²...40²), so BTT splits every width the
  same way: at 2^odd widths its rank-1 factors contract (16 -> 8), the layer's output RMS drops by
  1/sqrt(2) at every other width and the fit sees a zigzag, not a trend;
* BERT is post-LN: its block output is a LayerNorm of the residual stream, whose change is
  dominated by the (width-independent) embedding update, so ``Δh`` is measured on the FFN output
  ``output.dense`` instead, the residual-branch output the hidden layers' LR rule acts on.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from structlin import structurize
from structlin.coord import coord_check, fit_slopes
from structlin.mup import prepare

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

VOCAB, SEQ, BATCH, D_HEAD = 40, 32, 8, 16
WIDTHS = (64, 144, 256, 400)


def _config(family: str, width: int, d_head: int = D_HEAD):
    # pad_token_id=None: a padding index would freeze token 0's embedding row at zero.
    common = {"vocab_size": VOCAB, "tie_word_embeddings": False, "pad_token_id": None}
    heads = width // d_head
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=width, n_layer=2, n_head=heads, n_positions=SEQ, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common,
        )  # fmt: skip
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
            num_attention_heads=heads, num_key_value_heads=heads, head_dim=d_head,
            max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0, **common,
        )  # fmt: skip
    return transformers.BertConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
        num_attention_heads=heads, max_position_embeddings=SEQ, type_vocab_size=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common,
    )  # fmt: skip


_MODELS = {
    "gpt2": ("GPT2LMHeadModel", "transformer.h.1"),
    "llama": ("LlamaForCausalLM", "model.layers.1"),
    "bert": ("BertForMaskedLM", "bert.encoder.layer.1.output.dense"),
}  # the model class and the module whose output is measured


def _factory(family: str, structure: str):
    cls = getattr(transformers, _MODELS[family][0])

    def make(width: int) -> torch.nn.Module:
        model = cls(_config(family, width))
        if structure != "dense":
            structurize(model, structure)
        prepare(model)
        return model

    return make


def _markov_tokens(n: int = 8192) -> torch.Tensor:
    """A fixed random Markov chain: each character has 3 successors, taken with p 0.6/0.3/0.1."""
    gen = torch.Generator().manual_seed(0)
    successors = torch.randint(0, VOCAB, (VOCAB, 3), generator=gen)
    picks = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), n, replacement=True, generator=gen)
    tokens = [0]
    for pick in picks[1:].tolist():
        tokens.append(int(successors[tokens[-1], pick]))
    return torch.tensor(tokens)


TOKENS = _markov_tokens()


def _batches():
    gen = torch.Generator().manual_seed(1)
    while True:
        starts = torch.randint(0, len(TOKENS) - SEQ - 1, (BATCH,), generator=gen)
        windows = torch.stack([TOKENS[s : s + SEQ + 1] for s in starts.tolist()])
        yield windows[:, :-1], windows[:, 1:]


def _loss(out, y):
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


def _slopes(family: str) -> dict[str, float]:
    records = []
    for structure, rule in (("dense", "dense"), ("btt", "structure-aware"), ("btt", "dense")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' notes on the toy configs
            records += coord_check(
                _factory(family, structure),
                WIDTHS,
                _batches,
                base_width=WIDTHS[0],
                lr=3e-3,
                steps=10,
                lr_rule=rule,
                loss_fn=_loss,
                record=[_MODELS[family][1]],
                label={"structure": structure, "lr_rule": rule},
            )
    # Step 1 moves only the zero-initialised readout: fit from step 2 on, as the paper does.
    fits = fit_slopes(records, layer=_MODELS[family][1], first_step=2)
    return {f"{f['structure']}/{f['lr_rule']}": f["slope"] for f in fits}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_coord_check_after_prepare(family):
    slopes = _slopes(family)
    assert abs(slopes["dense/dense"]) < 0.2, slopes
    assert abs(slopes["btt/structure-aware"]) < 0.2, slopes
    assert slopes["btt/dense"] < -0.25, slopes
    assert slopes["btt/dense"] < slopes["btt/structure-aware"] - 0.15, slopes


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_prepare_finds_the_readout_and_reports_attention(family):
    cls = getattr(transformers, _MODELS[family][0])
    model = cls(_config(family, 128))
    report = prepare(model)
    readout = {"gpt2": "lm_head", "llama": "lm_head", "bert": "cls.predictions.decoder"}[family]
    assert report.readout == readout and not model.get_output_embeddings().weight.any()
    residual = {r.name.rpartition(".")[2] for r in report if r.kind == "residual"}
    expected = {"gpt2": {"c_proj"}, "llama": {"o_proj", "down_proj"}, "bert": {"dense"}}
    assert residual == expected[family]
    assert sum(r.kind == "residual" for r in report) == 4  # attention and MLP output per block
    # Without a base model prepare cannot tell whether d_head grows: it reports the scale.
    attention = [r for r in report.cannot_change if r.kind == "attention"]
    assert len(attention) == 2 and f"d_head={D_HEAD}" in attention[0].detail
    assert "pass base=" in attention[0].detail
    assert prepare(model).to_dict() == report.to_dict()  # idempotent
    # Heads of a fixed size (more heads at width 128 than at 64): the scale is kept.
    with torch.device("meta"):
        fixed_head = cls(_config(family, 64))
        growing_head = cls(_config(family, 64, d_head=D_HEAD // 2))  # same 8 heads, d_head grows
    kept = [r for r in prepare(model, base=fixed_head) if r.kind == "attention"]
    assert len(kept) == 2 and all(r.action == "kept" for r in kept)
    flagged = prepare(model, base=growing_head).cannot_change
    attention = [r for r in flagged if r.kind == "attention"]
    assert len(attention) == 2 and f"base model: d_head={D_HEAD // 2}" in attention[0].detail


def test_tied_gpt2_head_is_reported_and_the_embedding_kept():
    cfg = _config("gpt2", 64)
    cfg.tie_word_embeddings = True
    model = transformers.GPT2LMHeadModel(cfg)
    wte = model.transformer.wte.weight.clone()
    report = prepare(model)
    assert torch.equal(model.transformer.wte.weight, wte)
    assert [r.name for r in report.cannot_change if r.kind == "readout"] == ["lm_head"]
