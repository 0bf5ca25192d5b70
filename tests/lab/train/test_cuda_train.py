"""Training on CUDA: the Trainer with bf16 autocast, and a BTT GPT-2 with weight normalisation.

CI has no GPU, so these skip there (with the reason); ``benchmarks/gpu_check.sh`` runs them on a
lent GPU machine.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_trainer_runs_on_cuda_with_bf16_autocast(tiny_config, tmp_path):
    from structlin_lab.train import Trainer

    cfg = tiny_config("structure.spec=btt", "train.device=cuda", "train.autocast=auto")
    result = Trainer(cfg, tmp_path / "run", log=None).fit()
    assert result["status"] == "finished"
    assert torch.isfinite(torch.tensor(result["train_loss"]))
    assert result["test_acc"] > 0.4  # 3 learnable classes: chance is 1/3


def test_gpt2_btt_weight_norm_trains_on_cuda(tmp_path):
    from lm_cases import tiny_lm_config
    from structlin_lab.train import Trainer

    cfg = tiny_lm_config(
        tmp_path,
        "model.width=64",
        "model.base_width=32",
        "model.depth=2",
        "model.kwargs={d_head: 16}",
        "structure.spec=btt:rank=2,norm=rms_clamp",
        "data.block_size=32",
        "data.batch_size=16",
        "data.eval_batches=2",
        "train.steps=60",
        "train.eval_every=20",
        "train.device=cuda",
        repeats=400,
    )
    result = Trainer(cfg, tmp_path / "lm", log=None).fit()
    assert result["status"] == "finished"
    assert result["test_loss"] < 2.0  # chance for ~30 characters is log(30) = 3.4


def test_resume_on_cuda_continues_the_run(tiny_config, tmp_path):
    """Interrupt a CUDA run after 6 steps, resume it, and match an uninterrupted run."""
    import signal

    from train_helpers import after_step, rows

    from structlin_lab.train import Trainer

    def cfg():
        return tiny_config("structure.spec=btt", "train.device=cuda", "train.autocast=off")

    Trainer(cfg(), tmp_path / "full", log=None).fit()
    t = Trainer(cfg(), tmp_path / "part", log=None)

    def stop_after_six(step):
        if step == 5:
            t._stop_signal = signal.SIGTERM

    after_step(t, stop_after_six)
    assert t.fit()["status"] == "interrupted"
    resumed = Trainer(cfg(), tmp_path / "part", resume=True, log=None).fit()
    assert resumed["status"] == "finished"
    a, b = rows(tmp_path / "full"), rows(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["train_loss"] - rb["train_loss"]) <= 1e-4 * abs(ra["train_loss"])
