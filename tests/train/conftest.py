"""Shared fixtures for trainer tests."""

import pickle

import numpy as np
import pytest


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory):
    """A tiny CIFAR-10 in the official python format (learnable: class = brightest channel)."""
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)

    def batch(n):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 100, (n, 3, 32, 32), dtype=np.uint8)
        x[np.arange(n), y] += 120
        return {b"data": x.reshape(n, 3072), b"labels": y.tolist()}

    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch(64)))
    (root / "test_batch").write_bytes(pickle.dumps(batch(96)))
    names = [f"c{i}".encode() for i in range(10)]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return root
