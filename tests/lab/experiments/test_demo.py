import gzip
import json

import numpy as np

from structlin_lab.experiments.demo import format_summary, matched_width, mlp_macs, run_demo


def _idx(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _fake_fashion(folder, n_train=256, n_test=64):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28))
        x[np.arange(n), y, :] += 150  # learnable: the bright row is the class
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(x)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(y)))
    return folder


def test_matched_width_matches_forward_macs():
    target = mlp_macs(784, 10, 256, 3, "dense")
    width = matched_width(target, 784, 10, 3, "btt")
    assert width > 256
    assert abs(mlp_macs(784, 10, width, 3, "btt") - target) / target < 0.1


def test_demo_runs_end_to_end(tmp_path):
    src = _fake_fashion(tmp_path / "fm")
    rows = run_demo(
        source=str(src),
        root=str(tmp_path / "cache"),
        download=False,
        dense_width=32,
        depth=1,
        epochs=2,
        batch_size=64,
        out_dir=tmp_path / "out",
        log=lambda *_: None,
    )
    assert [r["structure"] for r in rows] == ["dense", "btt"]
    dense, btt = rows
    assert (
        abs(btt["macs_per_example"] - dense["macs_per_example"]) / dense["macs_per_example"] < 0.2
    )
    assert all(0.0 <= r["test_error"] <= 1.0 for r in rows)
    assert dense["test_error"] < 0.9  # it learned something
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved == rows
    assert (tmp_path / "out" / "demo.png").is_file()
    assert "btt" in format_summary(rows)
