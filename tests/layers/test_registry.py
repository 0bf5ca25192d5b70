"""The structure registry: names, spec strings, options and custom structures."""

from __future__ import annotations

import math

import pytest
import torch

from structlin import (
    BlockDiagLinear,
    BTTLinear,
    DenseLinear,
    KronLinear,
    LowRankLinear,
    MonarchLinear,
    StructuredLinear,
    TTLinear,
    get_structure,
    list_structures,
    make_linear,
    parse_spec,
    register_structure,
)
from structlin.layers import registry
from structlin.layers.spec import format_spec

BUILTIN = {
    "dense": DenseLinear,
    "low_rank": LowRankLinear,
    "block_diag": BlockDiagLinear,
    "tt": TTLinear,
    "kron": KronLinear,
    "btt": BTTLinear,
    "monarch": MonarchLinear,
}


def test_builtin_structures_registered():
    names = list_structures()
    assert names == sorted(names)
    assert set(BUILTIN) <= set(names)
    for name, cls in BUILTIN.items():
        assert get_structure(name) is cls
        assert cls.structure == name
        assert issubclass(cls, StructuredLinear)


def test_list_structures_pattern():
    assert list_structures("b*") == ["block_diag", "btt", "btt_moe"]
    assert list_structures("*ron*") == ["kron"]
    assert list_structures("low_?ank") == ["low_rank"]
    assert list_structures("no-such-*") == []


@pytest.mark.parametrize(("name", "cls"), list(BUILTIN.items()))
def test_make_linear_by_name_and_class(name, cls):
    by_name = make_linear(name, 16, 24)
    by_class = make_linear(cls, 16, 24, bias=False)
    assert type(by_name) is cls and type(by_class) is cls
    assert (by_name.in_features, by_name.out_features) == (16, 24)
    assert by_name.bias is not None and by_class.bias is None
    assert make_linear(name, 16, 24, dtype=torch.float64).to_dense().dtype == torch.float64


def test_make_linear_spec_string():
    layer = make_linear("btt:rank=2,cores=3", 64, 27)
    assert isinstance(layer, BTTLinear)
    assert layer.rank == 2 and len(layer.in_factors) == 3
    assert make_linear("low_rank:rank=5", 20, 30).rank == 5
    assert make_linear("monarch:blocks=2", 16, 16).blocks == 2
    assert make_linear(" btt : rank = 2 , cores = 2 ", 16, 16).rank == 2


@pytest.mark.parametrize(
    ("spec", "factors"),
    [
        ("btt:in_factors=24x32", (24, 32)),
        ("btt:in_factors=(24,32)", (24, 32)),
        ("btt:in_factors=[24, 32]", (24, 32)),
        ("btt:in_factors=32x24", (32, 24)),
        ("btt:in_factors=(32, 24)", (32, 24)),
    ],
)
def test_make_linear_tuple_values(spec, factors):
    assert parse_spec(spec)[1]["in_factors"] in (factors, list(factors))
    layer = make_linear(spec, 768, 768)
    assert tuple(layer.in_factors) == factors


def test_make_linear_tuple_and_other_options_together():
    layer = make_linear("btt:in_factors=(32,24),rank=2,out_factors=4x6", 768, 24)
    assert layer.in_factors == (32, 24) and layer.out_factors == (4, 6) and layer.rank == 2


def test_kwargs_override_spec():
    layer = make_linear("btt:rank=4,cores=2", 64, 64, rank=2)
    assert layer.rank == 2
    assert make_linear("low_rank:rank=3", 10, 10, rank=7).rank == 7


def test_parse_spec_values():
    name, opts = parse_spec("tt:rank=4,in_factors=2x3x4,pad_tolerance=0.25,flag=true,x=none,s=abc")
    assert name == "tt"
    assert opts == {
        "rank": 4,
        "in_factors": (2, 3, 4),
        "pad_tolerance": 0.25,
        "flag": True,
        "x": None,
        "s": "abc",
    }
    assert parse_spec("dense") == ("dense", {})
    assert parse_spec("dense:") == ("dense", {})


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"rank": 4, "in_factors": (24, 32), "out_factors": (2, 3, 4)},
        {"pad_tolerance": 0.25, "norm": "rms_clamp", "learn_gamma": False},
        {"pad_tolerance": math.inf, "x": None, "one": (5,), "s": "true", "t": "24x32"},
    ],
)
def test_format_spec_is_read_back_by_parse_spec(options):
    text = format_spec("btt", options)
    assert parse_spec(text) == ("btt", options)
    assert text == "btt" if not options else text.startswith("btt:")


def test_format_spec_writes_tuples_and_strings_compactly():
    assert format_spec("tt", {"in_factors": (24, 32), "norm": "rms_clamp"}) == (
        "tt:in_factors=24x32,norm=rms_clamp"
    )
    assert format_spec("x", {"s": "none"}) == "x:s='none'"  # quoted: bare would read as None


@pytest.mark.parametrize("spec", ["", "   ", "btt:rank", "btt:=3", "btt:rank=2,,=1"])
def test_parse_spec_errors(spec):
    with pytest.raises(ValueError, match=r"spec|option"):
        parse_spec(spec)


def test_unknown_structure_lists_valid_names():
    for call in (lambda: make_linear("bttt", 8, 8), lambda: get_structure("bttt")):
        with pytest.raises(ValueError, match="bttt") as info:
            call()
        for name in BUILTIN:
            assert name in str(info.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError) as info:
        make_linear("btt:rnak=2", 16, 16)
    msg = str(info.value)
    assert "rnak" in msg and "btt" in msg
    for opt in ("cores", "rank", "in_factors", "out_factors", "pad_tolerance"):
        assert opt in msg
    with pytest.raises(ValueError, match="blocks") as info:
        make_linear("low_rank", 16, 16, blocks=2)
    assert "rank" in str(info.value)
    with pytest.raises(ValueError, match="rank"):
        make_linear(DenseLinear, 4, 4, rank=2)


def test_make_linear_rejects_other_classes():
    with pytest.raises(ValueError, match="StructuredLinear"):
        make_linear(torch.nn.Linear, 4, 4)


class _TaggedDense(DenseLinear):
    """A custom structure with its own keyword option."""

    def __init__(self, in_features, out_features, bias=True, *, tag="none", **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self.tag = tag


@pytest.fixture
def custom_structure():
    name = "test_tagged_dense"
    assert name not in registry._REGISTRY
    try:
        yield name, register_structure(name)(_TaggedDense)
    finally:
        registry._REGISTRY.pop(name, None)
    assert name not in list_structures()


def test_register_custom_structure(custom_structure):
    name, cls = custom_structure
    assert cls is _TaggedDense and cls.structure == name
    assert name in list_structures() and get_structure(name) is cls
    assert list_structures("test_tagged_*") == [name]
    layer = make_linear(f"{name}:tag=hello", 4, 5, dtype=torch.float64)
    assert isinstance(layer, _TaggedDense) and layer.tag == "hello"
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
    assert make_linear(cls, 4, 5, tag="x").tag == "x"
    with pytest.raises(ValueError, match="tag"):
        make_linear(f"{name}:tga=1", 4, 5)
    # same class again is a no-op; another class under the name is refused
    assert register_structure(name)(cls) is cls
    with pytest.raises(ValueError, match=name):
        register_structure(name)(DenseLinear)


def test_register_rejects_non_structured():
    with pytest.raises(TypeError):
        register_structure("test_not_a_layer")(torch.nn.Linear)
    assert "test_not_a_layer" not in list_structures()
