"""The helpers of the report scripts in scripts/ whose numbers appear in docs/results*.md."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cifar():
    pytest.importorskip("matplotlib")
    pytest.importorskip("scipy")
    return _load("report_cifar10")


def test_vertex_recovers_a_parabola_optimum_in_log_lr(cifar):
    # error = (log10 lr + 2.3)^2: optimum at lr = 10^-2.3 ~ 5.0e-3, between grid points
    by_lr = {lr: (math.log10(lr) + 2.3) ** 2 for lr in (1e-3, 3e-3, 1e-2, 3e-2)}
    assert cifar.vertex(by_lr) == pytest.approx(10**-2.3, rel=1e-6)


def test_vertex_at_the_edge_of_the_grid_is_the_grid_point(cifar):
    assert cifar.vertex({1e-3: 0.5, 3e-3: 0.6, 1e-2: 0.7}) == 1e-3
    assert cifar.vertex({1e-3: 0.7, 3e-3: 0.6, 1e-2: 0.5}) == 1e-2


@pytest.mark.parametrize(
    ("spec", "width", "expected"),
    [("dense", 256, 256.0), ("btt:rank=1", 1024, 64.0), ("monarch:blocks=4", 1024, 512.0)],
)
def test_xi_is_macs_per_unit_width(cifar, spec, width, expected):
    # dense: d; BTT rank r on sqrt(d) x sqrt(d) factors: 2 r sqrt(d); Monarch with b blocks: 2d/b
    assert cifar.xi_of(spec, width) == pytest.approx(expected)
