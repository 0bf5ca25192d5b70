"""Shared test fixtures: one intra-op thread per test (the suite runs two pytest-xdist workers
on two cores; tiny ops thrash with two intra-op threads each), a tiny fake CIFAR-10 and a tiny
training config on it."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture
def tiny_config(fake_cifar, tmp_path):
    """``tiny_config(*overrides)``: a 12-step MLP training config on ``fake_cifar``."""
    from structlin_lab.train import load_config

    def make(*extra):
        return load_config(
            None,
            [
                "name=t",
                "model.name=mlp",
                "model.width=32",
                "model.base_width=16",
                "model.depth=1",
                f"data.source={fake_cifar}",
                f"data.root={tmp_path / 'cache'}",
                "data.batch_size=32",
                "data.eval_batch_size=50",
                "optim.lr=3e-3",
                "train.steps=12",
                "train.eval_every=4",
                "train.ckpt_every=4",
                "train.progress=false",
                "train.seed=1",
                *extra,
            ],
        )

    return make
