import pytest
import torch
from torch import nn

import structlin as sl
from structlin_lab.train.monitor import factor_rms_stats


def test_factor_rms_stats_over_structured_layers_only():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    assert factor_rms_stats(plain) == {}
    model = nn.Sequential(sl.make_linear("btt", 256, 256), nn.ReLU(), nn.Linear(256, 10))
    stats = factor_rms_stats(model)
    ratios = [r.item() for r in model[0].rms_ratios()]
    assert stats["factor_rms_max"] == pytest.approx(max(ratios))
    assert stats["factor_rms_mean"] == pytest.approx(sum(ratios) / len(ratios))
    with torch.no_grad():
        model[0].factors()[1].tensor.mul_(5.0)
    grown = factor_rms_stats(model)
    assert grown["factor_rms_max"] == pytest.approx(5.0 * ratios[1], rel=1e-5)
    assert grown["factor_rms_mean"] > stats["factor_rms_mean"]


def test_factor_rms_stats_sees_through_wrappers():
    layer = sl.make_linear("monarch", 64, 64)
    wrapped = nn.ModuleDict({"inner": nn.Sequential(layer)})
    assert factor_rms_stats(wrapped) == factor_rms_stats(layer)
