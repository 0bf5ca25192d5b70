import pytest
import torch
from torch import nn

import structlin_lab.models as models
from structlin_lab.models import (
    GPT2,
    MLP,
    GPTConfig,
    ViT,
    create_model,
    list_models,
    register_model,
    registry,
)


@pytest.fixture
def isolated_registry(monkeypatch):
    # Registrations made by a test must not leak into the others.
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))


def test_exports():
    for name in ("MLP", "ViT", "GPT2", "GPTConfig", "create_model", "list_models"):
        assert name in models.__all__ and hasattr(models, name)
    assert "register_model" in models.__all__


def test_builtin_models_are_listed():
    assert {"mlp", "vit", "gpt2"} <= set(list_models())
    assert list_models() == sorted(list_models())
    assert list_models("gp*") == ["gpt2"]
    assert list_models("nothing*") == []


def test_create_builds_each_family_with_its_kwargs():
    mlp = create_model("mlp", in_features=12, num_classes=3, width=8, depth=1)
    assert type(mlp) is MLP and mlp.head.out_features == 3 and len(mlp.blocks) == 1
    vit = create_model("vit", num_classes=5, width=16, depth=1, heads=2)
    assert type(vit) is ViT and vit(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    gpt = create_model("gpt2", vocab_size=50, block_size=8, n_layer=1, d_model=32, d_head=16)
    assert type(gpt) is GPT2 and isinstance(gpt.config, GPTConfig)
    assert gpt.config.d_model == 32 and gpt.n_head == 2 and len(gpt.blocks) == 1
    assert gpt(torch.zeros(1, 8, dtype=torch.long))[0].shape == (1, 8, 50)


def test_gpt2_factory_defaults_are_gptconfigs():
    with torch.device("meta"):
        gpt = create_model("gpt2", n_layer=1)
    assert gpt.config == GPTConfig(n_layer=1)


def test_unknown_name_lists_registered_models():
    with pytest.raises(ValueError, match="unknown model 'resnet'") as err:
        create_model("resnet")
    assert "gpt2, mlp, vit" in str(err.value)


@pytest.mark.parametrize(
    "name, kwargs, bad, accepted",
    [
        ("mlp", {"ffn_expansion": 2}, "ffn_expansion", "expansion"),  # the MLP's name
        ("vit", {"num_classes": 3, "width": 8, "depth": 1, "n_head": 2}, "n_head", "heads"),
        ("gpt2", {"d_modle": 64}, "d_modle", "d_model"),
    ],
)
def test_unknown_kwargs_list_accepted_ones(name, kwargs, bad, accepted):
    with pytest.raises(ValueError, match=r"unknown argument\(s\)") as err:
        create_model(name, **kwargs)
    unknown, _, listed = str(err.value).partition("valid arguments are:")
    assert f"[{bad!r}]" in unknown
    assert accepted in listed.replace(",", " ").split()


def test_missing_required_kwarg_is_a_value_error():
    with pytest.raises(ValueError, match="width"):
        create_model("vit", num_classes=3, depth=1)


def test_invalid_config_values_surface_from_the_model():
    with pytest.raises(ValueError, match="not divisible by d_head"):
        create_model("gpt2", d_model=100)


def test_register_custom_model(isolated_registry):
    @register_model("tiny_linear")
    def tiny_linear(d: int = 4, *, bias: bool = True) -> nn.Module:
        return nn.Linear(d, d, bias=bias)

    assert tiny_linear(3).in_features == 3  # the decorator returns the factory unchanged
    assert "tiny_linear" in list_models()
    layer = create_model("tiny_linear", d=6, bias=False)
    assert layer.in_features == 6 and layer.bias is None
    with pytest.raises(ValueError, match="valid arguments are: d, bias"):
        create_model("tiny_linear", width=3)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_linear")(tiny_linear)
    with pytest.raises(ValueError, match="already registered"):
        register_model("vit")(ViT)


def test_var_keyword_factory_accepts_anything(isolated_registry):
    seen = {}

    @register_model("recorder")
    def recorder(**kwargs) -> nn.Module:
        seen.update(kwargs)
        return nn.Identity()

    assert isinstance(create_model("recorder", anything=1), nn.Identity)
    assert seen == {"anything": 1}


def test_register_errors(isolated_registry):
    with pytest.raises(ValueError, match="non-empty string"):
        register_model("")
    with pytest.raises(TypeError, match="not callable"):
        register_model("x")(42)
    assert "x" not in list_models()
