import importlib.util
import json
import sys

import pytest

from structlin_lab.train import Trainer


def _has_tensorboard() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


@pytest.mark.skipif(not _has_tensorboard(), reason="tensorboard is not installed")
def test_tensorboard_writes_every_metrics_row(fake_cifar, tmp_path, tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    Trainer(tiny_config("train.tensorboard=true"), run, log=None).fit()
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


def test_tensorboard_off_writes_nothing(fake_cifar, tmp_path, tiny_config):
    run = tmp_path / "run"
    Trainer(tiny_config("train.steps=4"), run, log=None).fit()
    assert not (run / "tensorboard").exists()


def test_missing_tensorboard_is_a_clear_error_at_construction(
    fake_cifar, tmp_path, monkeypatch, tiny_config
):
    # A None entry in sys.modules makes the import fail, as if the package were absent.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run = tmp_path / "run"
    with pytest.raises(ImportError, match=r"pip install 'structlin\[tensorboard\]'"):
        Trainer(tiny_config("train.tensorboard=true"), run, log=None)
    assert not run.exists()  # nothing was written before the error


@pytest.mark.skipif(not _has_tensorboard(), reason="tensorboard is not installed")
def test_overwrite_replaces_old_tensorboard_events(fake_cifar, tmp_path, tiny_config):
    run = tmp_path / "run"
    c = tiny_config("train.tensorboard=true", "train.steps=4")
    Trainer(c, run, log=None).fit()
    old = set((run / "tensorboard").iterdir())
    Trainer(c, run, overwrite=True, log=None).fit()
    new = set((run / "tensorboard").iterdir())
    assert len(new) == 1 and not old & new
