"""shapes_only: the data shapes a model needs, read from the config alone; model_at_width."""

import pytest
import torch

from structlin_lab.train import load_config
from structlin_lab.train.build import DataShapes, model_at_width, shapes_only


@pytest.mark.parametrize(
    ("sets", "outputs", "shape"),
    [
        (["data.name=cifar100"], 100, (3, 32, 32)),
        (["data.name=fashion_mnist"], 10, (1, 28, 28)),
        (
            ["data.name=imagenet", "model.name=vit", "model.kwargs={image_size: 64}"],
            1000,
            (3, 64, 64),
        ),
        (["task=lm", "model.name=gpt2", "data.tokenizer=gpt2"], 50257, None),
    ],
)
def test_shapes_from_the_config(sets, outputs, shape):
    shapes = shapes_only(load_config(None, ["train.steps=1", *sets]))
    assert shapes == DataShapes(outputs, shape)


def test_char_vocabulary_is_unknown_unless_given():
    cfg = load_config(None, ["train.steps=1", "task=lm", "model.name=gpt2", "data.tokenizer=char"])
    assert shapes_only(cfg) is None
    assert shapes_only(cfg, vocab=65) == DataShapes(65)


def test_model_at_width_takes_its_sizes_from_the_shapes():
    mlp_cfg = load_config(None, ["train.steps=1", "model.name=mlp", "model.depth=1"])
    with torch.device("meta"):
        mlp = model_at_width(mlp_cfg, 48, DataShapes(7, (1, 4, 5)))
    assert mlp(torch.zeros(2, 1, 4, 5, device="meta")).shape == (2, 7)
    assert mlp.input_layer.in_features == 20 and mlp.input_layer.out_features == 48
    lm = ["train.steps=1", "task=lm", "model.name=gpt2", "model.depth=1", "data.block_size=8"]
    with torch.device("meta"):
        gpt = model_at_width(
            load_config(None, [*lm, "model.kwargs={d_head: 8}"]), 32, DataShapes(11)
        )
    logits, _ = gpt(torch.zeros(2, 8, dtype=torch.long, device="meta"))
    assert logits.shape == (2, 8, 11)
    with pytest.raises(ValueError, match="needs image data"):
        model_at_width(load_config(None, [*lm, "model.name=mlp"]), 32, DataShapes(11))


@pytest.mark.parametrize(
    ("spec", "mlp"),
    [
        ("dense", "dense"),
        ("btt:rank=2", "dense"),
        ("btt_moe:experts=8,top_k=2", "dense"),
        ("btt_moe:experts=4,top_k=1", "dense"),
        ("dense", "moe"),
    ],
)
def test_forward_macs_counts_attention_and_only_the_active_experts(spec, mlp):
    # On CPU, FlopCounterMode has no formula for the attention kernel, and BTT-MoE runs every
    # expert on an input this small: the count must still be the model's analytic MACs.
    from structlin_lab.train.build import build_model, forward_macs

    sets = ["train.steps=1", "task=lm", "model.name=gpt2", "model.depth=2", "model.width=64"]
    sets += [f"model.kwargs={{d_head: 16, mlp: {mlp}}}", "data.block_size=16"]
    sets += [f"structure.spec={spec}"]
    cfg = load_config(None, sets)
    model, _ = build_model(cfg, DataShapes(50), torch.device("cpu"))
    counted = forward_macs(model, torch.zeros(1, 16, dtype=torch.long))
    assert counted == 16 * model.macs_per_token()
    moes = [m for m in model.modules() if hasattr(m, "compute")]
    assert all(m.compute == "auto" for m in moes)  # the count leaves the layers as they were
