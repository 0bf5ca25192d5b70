import math

import numpy as np
import pytest
import torch

from structlin.coord import coord_check, default_record_modules, fit_slopes, save_csv
from structlin_lab.experiments.coord_mlp import run_coord_check_mlp
from structlin_lab.models import MLP


def _stream(n_in=48, n_cls=5, batch=32, seed=0):
    def batches():
        gen = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randn(batch, n_in, generator=gen)
            yield x, (x[:, :n_cls].argmax(1))

    return batches


def test_records_have_h_and_dh_per_step_and_layer():
    recs = coord_check(
        lambda w: MLP(48, 5, w, 2),
        [16, 32],
        _stream(),
        base_width=16,
        lr=1e-2,
        steps=3,
        label={"structure": "dense"},
    )
    layers = {r["layer"] for r in recs}
    assert layers == set(default_record_modules(MLP(48, 5, 16, 2)))
    assert {r["width"] for r in recs} == {16, 32}
    assert {r["step"] for r in recs} == {0, 1, 2, 3}
    r0 = [r for r in recs if r["step"] == 0]
    assert all(math.isnan(r["dh"]) and r["h"] > 0 for r in r0 if r["layer"] == "input_layer")
    later = [r for r in recs if r["step"] == 3 and r["layer"] == "blocks.1"]
    assert all(r["dh"] > 0 and r["structure"] == "dense" for r in later)


def test_fit_slopes_and_csv(tmp_path):
    recs = []
    for w in (16, 64, 256):
        for step in (1, 2):
            recs.append(
                {
                    "structure": "s",
                    "lr_rule": "r",
                    "width": w,
                    "step": step,
                    "layer": "L",
                    "h": 1.0,
                    "dh": 0.1 * w**-0.5,
                }
            )
    (fit,) = fit_slopes(recs, layer="L")
    assert fit["slope"] == pytest.approx(-0.5)
    path = save_csv(recs, tmp_path / "r.csv")
    assert path.read_text().splitlines()[0].startswith("structure,lr_rule,width")
    with pytest.raises(ValueError, match="at least 2 widths"):
        fit_slopes(recs[:2], layer="L")


def test_mlp_runner_separates_structure_aware_from_naive(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (600, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 600)
    res = run_coord_check_mlp(
        x,
        y,
        x[:64],
        structures=("dense", "btt"),
        widths=(32, 64, 128),
        steps=4,
        batch_size=64,
        out_dir=tmp_path,
        log=lambda *_: None,
    )
    slopes = {(f["structure"], f["lr_rule"]): f["slope"] for f in res["fits"]}
    assert abs(slopes[("dense", "structure-aware")]) < 0.15
    # the naive rule shrinks BTT's updates with width much faster than the structure-aware one
    assert slopes[("btt", "dense")] < slopes[("btt", "structure-aware")] - 0.2
    assert (tmp_path / "records.csv").exists() and (tmp_path / "fits.json").exists()
