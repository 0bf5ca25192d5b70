import os
import signal

import numpy as np
import pytest
import torch
from train_helpers import after_step, rows

from lm_cases import tiny_lm_config
from structlin_lab.train import Trainer, TrainingDiverged, load_config
from structlin_lab.train.checkpoint import load_checkpoint


def test_trains_logs_and_checkpoints(fake_cifar, tmp_path, tiny_config):
    run = tmp_path / "run"
    result = Trainer(tiny_config("structure.spec=btt"), run, log=None).fit()
    assert result["status"] == "finished" and result["step"] == 12
    r = rows(run)
    assert [x["step"] for x in r] == [4, 8, 12]
    for key in (
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "lr",
        "epoch",
        "samples_per_s",
        "train_macs",
    ):
        assert key in r[-1]
    assert r[-1]["train_macs"] == 3 * r[-1]["forward_macs_per_example"] * 12 * 32
    # Factor growth against the μP init std: about 1 at the start, logged in every row.
    assert all(0 < x["factor_rms_mean"] <= x["factor_rms_max"] < 10 for x in r)
    assert r[-1]["lr"] < r[0]["lr"]  # cosine decay
    walls = [x["wall_time_s"] for x in r]
    assert 0 < walls[0] <= walls[1] <= walls[2]
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 12


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_resume_reproduces_an_uninterrupted_run_exactly(fake_cifar, tmp_path, tiny_config):
    full = tmp_path / "full"
    Trainer(tiny_config(), full, log=None).fit()
    part = tmp_path / "part"
    t = Trainer(tiny_config(), part, log=None)

    def stop_after_six(step):
        if step == 5:  # the step counter is incremented right after optimizer.step
            t._stop_signal = signal.SIGTERM

    after_step(t, stop_after_six)
    assert t.fit()["status"] == "interrupted"
    assert load_checkpoint(part / "checkpoints" / "last.pt")["step"] == 6
    Trainer(tiny_config(), part, resume=True, log=None).fit()
    a, b = rows(full), rows(part)
    keys = ("step", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "train_macs")
    assert [[x[k] for k in keys] for x in a] == [[x[k] for k in keys] for x in b]
    # wall time accumulates across the resume instead of restarting from zero
    assert b[-1]["wall_time_s"] > b[0]["wall_time_s"] > 0
    wa = load_checkpoint(full / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(part / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_real_signal_saves_and_exits_cleanly(fake_cifar, tmp_path, tiny_config):
    run = tmp_path / "sig"
    t = Trainer(tiny_config(), run, log=None)
    # Whatever SIGINT did before (the default handler; SIG_IGN when pytest runs in the background
    # of a non-interactive shell), fit() must put it back.
    before = signal.getsignal(signal.SIGINT)

    def send(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    after_step(t, send)
    result = t.fit()
    assert result["status"] == "interrupted" and result["step"] == 3
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_nan_loss_stops_with_a_clear_error_and_keeps_last_good_checkpoint(
    fake_cifar, tmp_path, tiny_config
):
    run = tmp_path / "nan"
    t = Trainer(tiny_config(), run, log=None)

    def poison(step):
        if step == 4:  # after the step-5 update (checkpoint at step 4 exists)
            with torch.no_grad():
                t.model.input_layer.weight.fill_(float("nan"))

    after_step(t, poison)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 6"):
        t.fit()
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_run_directory_protection(fake_cifar, tmp_path, tiny_config):
    run = tmp_path / "r"
    Trainer(tiny_config("train.steps=4"), run, log=None).fit()
    with pytest.raises(FileExistsError, match=r"--resume.*--overwrite"):
        Trainer(tiny_config("train.steps=4"), run, log=None)
    with pytest.raises(ValueError, match="different config"):
        Trainer(tiny_config("train.steps=4", "optim.lr=1e-2"), run, resume=True, log=None)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(tiny_config(), tmp_path / "empty", resume=True, log=None)
    Trainer(tiny_config("train.steps=4"), run, overwrite=True, log=None).fit()
    assert len(rows(run)) == 1


def test_language_model_task(tmp_path):
    c = tiny_lm_config(
        tmp_path, "data.eval_batches=2", "train.steps=30", "train.eval_every=10", repeats=200
    )
    Trainer(c, tmp_path / "lm", log=None).fit()
    r = rows(tmp_path / "lm")
    assert r[-1]["test_loss"] < r[0]["test_loss"] < np.log(30)


def test_imagenet_style_folder_streams_through_workers(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in range(3):
            folder = tmp_path / "inet" / split / f"n0{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)
                img[..., c] = 250
                Image.fromarray(img).save(folder / f"{i}.png")
    c = load_config(
        None,
        [
            "model.name=vit",
            "model.width=32",
            "model.base_width=16",
            "model.depth=1",
            "model.kwargs={heads: 2, patch_size: 16, image_size: 32}",
            "data.name=imagenet",
            f"data.source={tmp_path / 'inet'}",
            "data.batch_size=8",
            "data.eval_batch_size=6",
            "data.num_workers=0",
            "data.mixup=0.2",
            "data.label_smoothing=0.1",
            "train.steps=4",
            "train.eval_every=2",
            "train.progress=false",
            "optim.name=adamw",
        ],
    )
    result = Trainer(c, tmp_path / "run", log=None).fit()
    assert result["status"] == "finished" and result["step"] == 4
    r = rows(tmp_path / "run")
    assert [x["step"] for x in r] == [2, 4] and 0.0 <= r[-1]["test_acc"] <= 1.0
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["data"][0]["epoch"] == 1 and state["data"][0]["position"] == 1  # 3 per epoch


@pytest.mark.slow
def test_compiled_training_matches_eager(fake_cifar, tmp_path, tiny_config):
    eager = Trainer(tiny_config("train.steps=4"), tmp_path / "e", log=None).fit()
    comp = Trainer(
        tiny_config("train.steps=4", "train.compile=true"), tmp_path / "c", log=None
    ).fit()
    assert comp["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-4)


def test_ckpt_every_zero_writes_no_checkpoint(tmp_path, tiny_config):
    run = tmp_path / "run"
    result = Trainer(tiny_config("train.ckpt_every=0", "train.steps=4"), run, log=None).fit()
    assert result["status"] == "finished"
    assert not (run / "checkpoints" / "last.pt").exists()
    assert rows(run)[-1]["status"] == "finished"
    with pytest.raises(ValueError, match="ckpt_every"):
        tiny_config("train.ckpt_every=-1")
    with pytest.raises(ValueError, match="eval_every"):
        tiny_config("train.eval_every=0")


def test_checkpoint_holds_only_tensors_and_plain_values(fake_cifar, tmp_path, tiny_config):
    run = tmp_path / "run"
    Trainer(tiny_config("structure.spec=btt", "train.steps=4"), run, log=None).fit()
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4 and isinstance(state["rng"]["numpy"]["key"], torch.Tensor)
    assert state["config"]["structure"]["spec"] == "btt"


def test_moe_language_model_adds_and_logs_its_auxiliary_losses(tmp_path):
    """A GPT-2 with mixture-of-experts FFNs: the trainer adds the collected aux loss to the task
    loss and logs it with the experts' utilisation at every evaluation."""
    c = tiny_lm_config(
        tmp_path,
        "model.kwargs={d_head: 8, mlp: moe, n_experts: 4, top_k: 2}",
        "data.eval_batches=2",
        "train.eval_every=10",
        repeats=200,
    )
    trainer = Trainer(c, tmp_path / "moe", log=None)
    trainer.fit()
    r = rows(tmp_path / "moe")
    assert len(r) == 2
    for row in r:
        assert row["aux_loss"] > 0 and np.isfinite(row["aux_loss"])
        fractions = row["expert_fraction"]
        assert len(fractions) == 4 and abs(sum(fractions) - 1) < 1e-5
        assert 0 < row["expert_entropy"] <= np.log(4) + 1e-6
    # evaluation leaves no record behind that the next step would add to its loss
    from structlin import collect_aux

    assert collect_aux(trainer.model).loss is None


def test_a_checkpoint_from_before_a_config_field_existed_resumes(tmp_path, tiny_config):
    # An older structlin stored a config without train.compile_mode and hashed it without that
    # field; read with today's defaults it is the same config, so the run resumes exactly.
    full = tmp_path / "full"
    Trainer(tiny_config(), full, log=None).fit()
    part = tmp_path / "part"
    t = Trainer(tiny_config(), part, log=None)
    after_step(t, lambda step: setattr(t, "_stop_signal", signal.SIGTERM) if step == 5 else None)
    t.fit()
    ckpt = part / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt)
    del state["config"]["train"]["compile_mode"]
    state["config_hash"] = "written-by-old"
    torch.save(state, ckpt)
    Trainer(tiny_config(), part, resume=True, log=None).fit()
    assert [r["test_loss"] for r in rows(part)] == [r["test_loss"] for r in rows(full)]
    state["config"]["optim"]["lr"] = 1.0  # a config that really differs is still refused
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="different config"):
        Trainer(tiny_config(), part, resume=True, log=None).fit()
    state["config"]["train"]["no_such_field"] = 1
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=r"last\.pt does not read in this version"):
        Trainer(tiny_config(), part, resume=True, log=None).fit()
    saved = part / "config.yaml"  # the run's config.yaml is read the same way, first
    saved.write_text(saved.read_text() + "no_such_section: 1\n")
    with pytest.raises(ValueError, match=r"config\.yaml does not read in this version"):
        Trainer(tiny_config(), part, resume=True, log=None).fit()
