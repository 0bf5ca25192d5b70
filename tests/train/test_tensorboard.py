import importlib.util
import json
import sys

import pytest

from structlin.train import Trainer, load_config


def cfg(fake_cifar, tmp_path, *extra):
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


def _has_tensorboard() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


@pytest.mark.skipif(not _has_tensorboard(), reason="tensorboard is not installed")
def test_tensorboard_writes_every_metrics_row(fake_cifar, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    Trainer(cfg(fake_cifar, tmp_path, "train.tensorboard=true"), run, log=None).fit()
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file was written"

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    numeric = {
        k
        for k, v in rows[-1].items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }
    assert {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "samples_per_s"} <= numeric
    assert numeric <= tags
    loss = acc.Scalars("test_loss")
    assert [e.step for e in loss] == [r["step"] for r in rows] == [4, 8, 12]
    assert [e.value for e in loss] == pytest.approx([r["test_loss"] for r in rows], rel=1e-6)


def test_tensorboard_off_writes_nothing(fake_cifar, tmp_path):
    run = tmp_path / "run"
    Trainer(cfg(fake_cifar, tmp_path, "train.steps=4"), run, log=None).fit()
    assert not (run / "tensorboard").exists()


def test_missing_tensorboard_is_a_clear_error_at_construction(fake_cifar, tmp_path, monkeypatch):
    # A None entry in sys.modules makes the import fail, as if the package were absent.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run = tmp_path / "run"
    with pytest.raises(ImportError, match=r"pip install 'structlin\[tensorboard\]'"):
        Trainer(cfg(fake_cifar, tmp_path, "train.tensorboard=true"), run, log=None)
    assert not run.exists()  # nothing was written before the error


@pytest.mark.skipif(not _has_tensorboard(), reason="tensorboard is not installed")
def test_overwrite_replaces_old_tensorboard_events(fake_cifar, tmp_path):
    run = tmp_path / "run"
    c = cfg(fake_cifar, tmp_path, "train.tensorboard=true", "train.steps=4")
    Trainer(c, run, log=None).fit()
    old = set((run / "tensorboard").iterdir())
    Trainer(c, run, overwrite=True, log=None).fit()
    new = set((run / "tensorboard").iterdir())
    assert len(new) == 1 and not old & new
