"""Bad inputs to the library core: each gets one clear error (or, where the input is legal but
almost certainly a mistake, a warning) that names the bad value and says what to do.

One row per case: an id, the call, the exception or warning type it must raise, and substrings
the message must contain. Later rows (the lab, the command line) follow the same table form.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from structlin import make_linear, mup
from structlin.surgery import structurize


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


class Block(nn.Module):
    """A plain transformer FFN block: no head, no get_output_embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 128)
        self.fc2 = nn.Linear(128, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class ClassifierFirst(nn.Module):
    """Registers its classifier before the hidden layers."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(64, 10)
        self.hidden = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(x))


class TiedSquare(nn.Module):
    """A square tied pair, as GPT-2's embedding and head share one (vocab, d) matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Linear(32, 32)
        self.body = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 32)
        self.lm_head.weight = self.wte.weight

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def _restructure() -> None:
    model = mlp()
    structurize(model, "btt:rank=2")
    structurize(model, "low_rank:rank=2")


def _float64_into_float32() -> None:
    layer = make_linear("btt", 64, 64)
    layer(torch.randn(3, 64, dtype=torch.float64))


def _nan_from_dense() -> None:
    w = torch.randn(64, 64)
    w[3, 5] = float("nan")
    make_linear("low_rank:rank=4", 64, 64).from_dense(w)


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[], object]
    raises: type[Exception] | None  # the exception, or None for a warning
    warns: type[Warning] | None
    contains: tuple[str, ...]


def _groups(lr: float) -> Callable[[], object]:
    return lambda: mup.param_groups(mlp(), lr, base=mlp())


CASES = [
    # --- param_groups: the learning rate ---------------------------------------------------
    Case("lr-negative", _groups(-1e-3), ValueError, None, ("lr=-0.001", "positive", "lr=1e-3")),
    Case("lr-nan", _groups(math.nan), ValueError, None, ("lr=nan", "finite")),
    Case("lr-inf", _groups(math.inf), ValueError, None, ("lr=inf", "finite")),
    Case("lr-zero", _groups(0.0), None, UserWarning, ("lr=0", "not change any parameter")),
    # --- factorisation: padding beyond the tolerance, degenerate cores --------------------
    Case(
        "monarch-pad-beyond-tolerance",
        lambda: make_linear("monarch:blocks=7,pad_tolerance=0.05", 64, 64),
        ValueError,
        None,
        ("blocks=7", "64 -> 70", "pad_tolerance=5%", "blocks dividing 64"),
    ),
    Case(
        "btt-cores-10-on-64",
        lambda: make_linear("btt:cores=10", 64, 64),
        ValueError,
        None,
        ("in_features=64", "10 factors", "factor of 1", "cores <= 6"),
    ),
    Case(
        "structurize-btt-cores-10",
        lambda: structurize(mlp(), "btt:cores=10"),
        ValueError,
        None,
        ("every selected layer was refused", "cores <= 6"),
    ),
    # --- structurize: the real cause, not "no layer was selected" -------------------------
    Case(
        "structurize-rank-0-spec",
        lambda: structurize(mlp(), "btt:rank=0"),
        ValueError,
        None,
        ("every selected layer was refused", "rank", "got 0"),
    ),
    Case(
        "structurize-rank-0-kwarg",
        lambda: structurize(mlp(), "btt", rank=0),
        ValueError,
        None,
        ("every selected layer was refused", "rank", "got 0"),
    ),
    Case(
        "structurize-none",
        lambda: structurize(mlp(), None),
        ValueError,
        None,
        ("got None", "structure name", "'btt'"),
    ),
    Case(
        "structurize-bare-linear",
        lambda: structurize(nn.Linear(64, 32), "btt"),
        ValueError,
        None,
        ("bare Linear(64, 32)", "cannot be replaced in place", ".from_linear("),
    ),
    # --- structurize: silently wrong before, now a warning --------------------------------
    Case(
        "structurize-twice-different",
        _restructure,
        None,
        UserWarning,
        ("already structured differently", "'0'", "low_rank:rank=2", "dense model"),
    ),
    Case(
        "head-by-name-registered-first",
        lambda: structurize(ClassifierFirst(), "btt"),
        None,
        UserWarning,
        ("keeps 'classifier' dense", "get_output_embeddings", "overrides={'classifier'"),
    ),
    Case(
        "head-of-a-plain-block",
        lambda: structurize(Block(), "btt"),
        None,
        UserWarning,
        ("keeps 'fc2' dense", "last linear layer", "target_modules=", "overrides={'fc2'"),
    ),
    Case(
        "multihead-attention-in-proj",
        lambda: structurize(
            nn.ModuleDict({"mha": nn.MultiheadAttention(16, 2), "out": nn.Linear(16, 16)}),
            "btt",
            target_modules=["mha.out_proj", "out"],
        ),
        None,
        UserWarning,
        ("mha.in_proj", "in_proj_weight", "separate nn.Linear q/k/v"),
    ),
    Case(
        "override-on-a-tied-head",
        lambda: structurize(TiedSquare(), "btt", overrides={"lm_head": "low_rank:rank=4"}),
        None,
        UserWarning,
        ("lm_head", "tied", "tie_word_embeddings=False", "clone()"),
    ),
    # --- layers: inputs --------------------------------------------------------------------
    Case(
        "from-dense-nan",
        _nan_from_dense,
        ValueError,
        None,
        ("from_dense", "1 non-finite", "nan_to_num"),
    ),
    Case(
        "float64-into-float32-btt",
        _float64_into_float32,
        TypeError,
        None,
        ("torch.float64", "torch.float32", "x.float()", "dtype=torch.float64"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case) -> None:
    if case.raises is not None:
        with pytest.raises(case.raises) as info:
            case.call()
        message = str(info.value)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            case.call()
        found = [str(w.message) for w in caught if issubclass(w.category, case.warns)]
        message = next((m for m in found if case.contains[0] in m), "\n".join(found))
    for part in case.contains:
        assert part in message, f"{part!r} not in:\n{message}"


def test_monarch_padding_is_in_the_report() -> None:
    model = mlp()
    report = structurize(model, "monarch:blocks=7")
    row = next(r for r in report if r.name == "0")
    assert row.padding == "in 64->70, out 64->70"
    assert "padding" in str(report) and "in 64->70, out 64->70" in str(report)
    assert model[0].in_padded == 70  # within the default 15% tolerance: accepted, but shown
    exact = structurize(mlp(), "monarch:blocks=8")
    assert all(r.padding == "" for r in exact) and "padding" not in str(exact)


def test_an_override_keeps_the_common_options() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10))
    structurize(model, "btt", overrides={"1": "monarch:blocks=8"}, norm="rms_clamp")
    assert model[0].norm == "rms_clamp"
    assert model[1].spec == "monarch:blocks=8,norm=rms_clamp"  # norm kept, blocks from override
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10))
    structurize(model, "btt", overrides={"1": "monarch:blocks=8,norm=rms_clamp"}, norm=None)
    assert model[1].norm == "rms_clamp" and model[0].norm is None  # the override's own wins


def test_the_head_rule_keeps_the_classifier_registered_first() -> None:
    model = ClassifierFirst()
    with pytest.warns(UserWarning, match="keeps 'classifier' dense"):
        report = structurize(model, "btt")
    assert type(model.classifier) is nn.Linear
    assert report.replaced == ["hidden.0", "hidden.2"]


def test_a_model_with_get_output_embeddings_does_not_warn_about_its_head() -> None:
    model = TiedSquare()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = structurize(model, "btt", target_modules="all-linear", exclude_modules=["wte"])
    assert [r.status for r in report if r.name == "lm_head"] == ["kept (head)"]


def test_multihead_attention_in_proj_is_a_refused_row() -> None:
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(16, 2), "out": nn.Linear(16, 16)})
    with pytest.warns(UserWarning, match="kept some layers dense"):
        report = structurize(model, "btt", target_modules=["mha.out_proj", "out"])
    rows = {r.name: r for r in report}
    assert rows["mha.in_proj"].status.startswith("refused")
    assert rows["mha.in_proj"].params_before == 3 * 16 * 16 + 3 * 16
    assert rows["mha.out_proj"].status.startswith("refused") and rows["out"].changed
