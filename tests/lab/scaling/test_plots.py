import json

import pytest
import yaml

pytest.importorskip("matplotlib")

from structlin_lab.scaling.plots import plot_curves, plot_from_dirs, plot_lr_landscape, plot_scaling

WIDTHS = [32, 64, 128, 256]
LRS = [1e-3, 3e-3, 1e-2]


def _rows(structures=("dense", "lowrank"), widths=WIDTHS, lr_rule=None):
    rows = []
    for s_i, struct in enumerate(structures):
        for w in widths:
            C = 1e6 * w**2
            for lr in LRS:
                penalty = 1.0 + abs(lr - 3e-3) * 50
                err = min(0.9, 2.0 * C ** -(0.1 + 0.05 * s_i) * penalty)
                row = {
                    "structure": struct,
                    "width": w,
                    "lr": lr,
                    "seed": 0,
                    "train_macs": C,
                    "forward_macs_per_example": C / 1e4,
                    "final_test_error": err,
                    "final_train_error": 0.8 * err,
                    "best_test_error": 0.95 * err,
                    "status": "finished",
                }
                if lr_rule is not None:
                    row["lr_rule"] = lr_rule
                rows.append(row)
    return rows


def _check(paths, tmp_path):
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_plot_scaling_writes_png_and_pdf(tmp_path):
    # a structure with fewer than 3 widths is drawn without a fit line
    rows = _rows() + _rows(structures=("butterfly",), widths=[32, 64])
    paths = plot_scaling(rows, tmp_path / "fig" / "scaling")
    assert paths == [tmp_path / "fig" / "scaling.png", tmp_path / "fig" / "scaling.pdf"]
    _check(paths, tmp_path)


def test_same_rows_give_byte_identical_figures(tmp_path):
    # no creation date in the PDF: re-running a report does not churn committed figures
    first = [p.read_bytes() for p in plot_scaling(_rows(), tmp_path / "a" / "s")]
    second = [p.read_bytes() for p in plot_scaling(_rows(), tmp_path / "b" / "s")]
    assert first == second
    assert b"CreationDate" not in first[1]


def test_plot_scaling_suffix_and_options(tmp_path):
    paths = plot_scaling(
        _rows(), tmp_path / "s.png", x="forward_macs_per_example", y="best_test_error"
    )
    assert [p.name for p in paths] == ["s.png", "s.pdf"]
    _check(paths, tmp_path)
    # overwriting an existing figure works and still leaves no temp files
    _check(plot_scaling(_rows(), tmp_path / "s.png"), tmp_path)


def test_plot_lr_landscape_writes_png_and_pdf(tmp_path):
    rows = _rows() + _rows(lr_rule="mup")
    paths = plot_lr_landscape(rows, tmp_path / "lr")
    _check(paths, tmp_path)


def test_plot_lr_landscape_draws_seed_means_per_width_and_panel(tmp_path, monkeypatch):
    import structlin_lab.scaling.plots as plots

    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    # a second seed with errors 0.1 higher: the drawn point must be the mean of the two seeds
    rows = _rows() + [
        dict(r, seed=1, final_train_error=r["final_train_error"] + 0.1) for r in _rows()
    ]
    plot_lr_landscape(rows, tmp_path / "lr")
    (fig,) = figures
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [
        "dense (lr rule: structure-aware)",
        "lowrank (lr rule: structure-aware)",
    ]
    for ax, struct in zip(panels, ("dense", "lowrank"), strict=True):
        lines = ax.get_lines()
        assert [ln.get_label() for ln in lines] == [f"width {w}" for w in WIDTHS]
        for ln, w in zip(lines, WIDTHS, strict=True):
            assert list(ln.get_xdata()) == LRS
            seed0 = [r for r in _rows() if r["structure"] == struct and r["width"] == w]
            want = [100 * (r["final_train_error"] + 0.05) for r in seed0]
            assert list(ln.get_ydata()) == pytest.approx(want)


@pytest.mark.parametrize("fn", [plot_scaling, plot_lr_landscape])
def test_empty_rows_raise(fn, tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        fn([], tmp_path / "x")
    unfinished = [dict(r, status="running") for r in _rows()]
    with pytest.raises(ValueError, match="none of the"):
        fn(unfinished, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_fewer_than_three_widths_raises(tmp_path):
    with pytest.raises(ValueError, match=r"at least 3 widths.*dense: 2"):
        plot_scaling(_rows(structures=("dense",), widths=[32, 64]), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def _make_run(path, struct, width, lr, acc):
    path.mkdir(parents=True)
    cfg = {
        "name": path.name,
        "model": {"name": "mlp", "width": width, "depth": 3},
        "structure": {"spec": struct},
        "optim": {"lr": lr},
        "train": {"seed": 0},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    m = {
        "step": 10,
        "train_acc": acc,
        "test_acc": acc - 0.05,
        "train_macs": 1e6 * width**2,
        "status": "finished",
    }
    (path / "metrics.jsonl").write_text(json.dumps(m) + "\n")


def test_plot_from_dirs(tmp_path):
    runs = tmp_path / "runs"
    for w in WIDTHS:
        for lr in LRS:
            _make_run(runs / f"w{w}_lr{lr}", "dense", w, lr, 0.5 + w / 1000 - abs(lr - 3e-3))
    out = tmp_path / "out"
    _check(plot_from_dirs([runs], out, kind="scaling"), tmp_path)
    paths = plot_from_dirs(runs, out, kind="lr")
    assert [p.name for p in paths] == ["lr_landscape.png", "lr_landscape.pdf"]
    _check(paths, tmp_path)
    with pytest.raises(ValueError, match="unknown plot kind"):
        plot_from_dirs(runs, out, kind="bogus")


def test_plot_curves_panels_colours_and_cut_runs(tmp_path):
    full = [{"step": s, "train_loss": 5.0 - 0.01 * s} for s in range(0, 101, 10)]
    cut = full[:5]  # stopped early: marked with an x
    diverged = [*full[:3], {"step": 30, "train_loss": float("nan")}, *full[4:]]
    runs = [
        ("btt lr=0.1 s0", full),
        ("btt lr=0.1 s1", cut),
        ("dense lr=0.1 s0", diverged),
        ("dense lr=0.03 s0", []),  # no rows: left out
    ]
    paths = plot_curves(
        runs,
        tmp_path / "curves",
        panel=lambda label: label.split()[1],
        colour=lambda label: label.split()[0],
        title="test",
    )
    _check(paths, tmp_path)
    with pytest.raises(ValueError, match="no run has a finite"):
        plot_curves([("a", [{"step": 1, "train_loss": float("nan")}])], tmp_path / "x")


def test_plot_curves_ylim_clips_a_spike_and_marks_where_it_leaves(tmp_path, monkeypatch):
    import structlin_lab.scaling.plots as plots

    figs = []
    real_save = plots._save
    monkeypatch.setattr(
        plots, "_save", lambda fig, path: (figs.append(fig), real_save(fig, path))[1]
    )
    calm = [{"step": s, "train_loss": 6.0 - 0.005 * s} for s in range(0, 101, 10)]
    # Off the chart twice: steps 30-40 and 70.
    spiky = [
        {"step": s, "train_loss": 80.0 if s in (30, 40, 70) else 6.0} for s in range(0, 101, 10)
    ]
    paths = plot_curves(
        [("dense lr=1 s0", spiky), ("btt lr=1 s0", calm)],
        tmp_path / "clipped",
        panel=lambda label: label.split()[1],
        colour=lambda label: label.split()[0],
        ylim=(4.0, 9.0),
    )
    _check(paths, tmp_path)
    (ax,) = figs[0].axes
    assert ax.get_ylim() == (4.0, 9.0)
    markers = [line for line in ax.lines if line.get_marker() == "^"]
    assert len(markers) == 1  # only the spiky run
    assert list(markers[0].get_xdata()) == [30.0, 70.0]
    assert list(markers[0].get_ydata()) == [9.0, 9.0]
    for bad in [(9.0, 4.0), (4.0, float("nan")), (1.0, 1.0)]:
        with pytest.raises(ValueError, match="ylim must be two finite numbers"):
            plot_curves([("a", calm)], tmp_path / "bad", ylim=bad)
