"""The dense baseline is initialised as the paper's (Qiu et al., ICML 2024): every layer the
other structures replace gets the spectral μP init, and ``mup.describe`` reports what the
tensors hold."""

import io
import math

import pytest
import torch

from structlin import mup
from structlin_lab.train import load_config
from structlin_lab.train.build import DataShapes, build_model, model_at_width

CIFAR = DataShapes(10, (3, 32, 32))


def _describe_row(text: str, name: str) -> dict[str, str]:
    header, *rows = text.splitlines()
    keys = header.split()
    row = next(r.split() for r in rows if r.split()[0] == name)
    return dict(zip(keys, row, strict=True))


@pytest.mark.parametrize("width", [256, 1024])
def test_dense_baseline_input_layer_has_the_spectral_init(width):
    cfg = load_config(None, ["train.steps=1", "model.name=mlp", f"model.width={width}"])
    torch.manual_seed(0)
    model, base = build_model(cfg, CIFAR, torch.device("cpu"))
    w = model.input_layer.weight
    torch.manual_seed(0)
    plain = torch.nn.Linear(3072, width)  # what the dense baseline used to hold
    # the dense layers went through surgery (DenseLinear), with the state dict of the plain model
    assert type(model.input_layer).__name__ == "DenseLinear"
    assert model.state_dict().keys() == model_at_width(cfg, width, CIFAR).state_dict().keys()
    want = math.sqrt(min(3072, width)) / 3072
    # the std of n Gaussian draws has relative sampling error about 1 / sqrt(2 n) < 0.1% here
    assert w.std().item() == pytest.approx(want, rel=0.01)
    if width == 256:  # at 1024 nn.Linear's 1 / sqrt(3 * 3072) happens to equal 32 / 3072
        assert plain.weight.std().item() > 1.9 * want
    for name in ("blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1"):
        hidden = model.get_submodule(name).weight
        if bool(hidden.any()):  # a zero-initialised residual output stays zero, as in surgery
            fan_out, fan_in = hidden.shape
            spectral = math.sqrt(min(fan_in, fan_out)) / fan_in
            assert hidden.std().item() == pytest.approx(spectral, rel=0.02), name
    row = _describe_row(mup.describe(model, base=base, file=io.StringIO()), "input_layer.weight")
    assert float(row["init_std"]) == pytest.approx(want, rel=1e-3)
    assert float(row["std"]) == pytest.approx(w.std().item(), rel=1e-3)  # what the tensor holds


def test_describe_reports_a_default_init_that_differs():
    layer = torch.nn.Sequential(torch.nn.Linear(3072, 256), torch.nn.Linear(256, 10))
    text = mup.describe(layer, base=layer, file=io.StringIO())
    row = _describe_row(text, "0.weight")
    assert float(row["std"]) == pytest.approx(layer[0].weight.std().item(), rel=1e-3)
    # nn.Linear's default 1 / sqrt(3 * 3072) against the spectral 16 / 3072: twice as large
    assert float(row["std"]) == pytest.approx(2 * float(row["init_std"]), rel=0.02)


def test_a_config_reproduces_the_papers_input_split_with_in_factors():
    sets = [
        "train.steps=1",
        "model.name=mlp",
        "model.width=256",
        "structure.spec=btt",
        "structure.overrides={input_layer: {in_factors: [32, 96]}}",
    ]
    model, _ = build_model(load_config(None, sets), CIFAR, torch.device("cpu"))
    assert model.input_layer.in_factors == (32, 96)  # the paper code's greedy split
    assert model.blocks[0].fc1.in_factors == (16, 16)  # the others stay balanced
    default, _ = build_model(load_config(None, sets[:-1]), CIFAR, torch.device("cpu"))
    assert default.input_layer.in_factors == (48, 64)  # the library's balanced split
