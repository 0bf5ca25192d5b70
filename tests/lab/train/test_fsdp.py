"""FSDP2 (``train.distributed=fsdp``) under torchrun: 2 CPU processes (gloo) match 1 process, and
a sharded run interrupted and resumed through ``torch.distributed.checkpoint`` matches an
uninterrupted one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from structlin_lab.train import load_config
from structlin_lab.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

# Stops every rank after its third update, so the run saves (collectively) and exits; the same
# way SIGTERM does.
_INTERRUPT = """
import signal, sys
from structlin_lab.train import Trainer, load_config
t = Trainer(load_config(None, sys.argv[2:]), sys.argv[1], log=None)
real = t.optimizer.step
def step(*a, **k):
    out = real(*a, **k)
    if t.step == 2:
        t._stop_signal = signal.SIGTERM
    return out
t.optimizer.step = step
print("status", t.fit()["status"])
"""


def _settings(fake_cifar, tmp_path, *extra):
    # No augmentation or mixup: every sample's treatment is then independent of the sharding.
    # A BTT model, so that sharded structured factors and their μP groups are exercised.
    return [
        "name=fsdp",
        "model.name=mlp",
        "model.width=32",
        "model.base_width=16",
        "model.depth=1",
        "structure.spec=btt:rank=2",
        f"data.source={fake_cifar}",
        f"data.root={tmp_path / 'cache'}",
        "data.batch_size=32",
        "data.eval_batch_size=50",
        "data.augment=false",
        "data.mixup=0",
        "data.label_smoothing=0",
        "optim.lr=3e-3",
        "optim.clip=1.0",
        "train.steps=6",
        "train.eval_every=3",
        "train.ckpt_every=3",
        "train.progress=false",
        "train.seed=3",
        *extra,
    ]


def _launch(nproc: int, entry: list[str], args: list[str]) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        cmd += [f"--master-port={port}", "--master-addr=127.0.0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd + entry + args, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-6000:]
    return out


def _train(nproc, out, settings, *flags):
    entry = ["-m", "structlin_lab", "train"]
    return _launch(nproc, entry, ["--out", str(out), *flags, "--set", *settings])


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _sharded_weights(run, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / f"{run.name}-full.pt"
    dcp_to_torch_save(run / "checkpoints" / "dcp", target)
    return torch.load(target, weights_only=False)["model"]


def _assert_rows_match(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6]
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "test_loss", "test_acc", "samples", "train_macs"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key


def test_sharded_run_matches_one_process_and_resumes(fake_cifar, tmp_path):
    settings = _settings(fake_cifar, tmp_path, "train.distributed=fsdp")
    one, two, part = tmp_path / "one", tmp_path / "two", tmp_path / "part"
    _train(1, one, settings)
    _train(2, two, settings)
    _assert_rows_match(_rows(one), _rows(two))
    single = load_checkpoint(one / "checkpoints" / "last.pt")["model"]
    sharded = _sharded_weights(two, tmp_path)
    assert sorted(sharded) == sorted(single)  # names survive sharding
    for k, v in single.items():
        # reduce-scatter sums gradients in another order: float32 rounding, not drift
        assert torch.allclose(v, sharded[k], rtol=1e-4, atol=3e-5), k
    meta = load_checkpoint(two / "checkpoints" / "last.pt")
    assert "model" not in meta and len(meta["data"]) == 2  # weights live in dcp/

    # interrupted after 3 updates, then resumed: the same trajectory as the uninterrupted run
    script = tmp_path / "interrupt.py"
    script.write_text(_INTERRUPT)
    res = _launch(2, [str(script), str(part)], settings)
    assert "status interrupted" in res.stdout
    assert load_checkpoint(part / "checkpoints" / "last.pt")["step"] == 3
    _train(2, part, settings, "--resume")
    _assert_rows_match(_rows(two), _rows(part))
    resumed = _sharded_weights(part, tmp_path)
    for k, v in sharded.items():
        assert torch.allclose(v, resumed[k], rtol=1e-5, atol=1e-7), k


def test_distributed_mode_is_validated():
    with pytest.raises(ValueError, match=r"train\.distributed must be one of ddp, fsdp"):
        load_config(None, ["train.steps=1", "train.distributed=fsdp2"])
