"""The trainer's tasks: losses, accuracies, evaluation and data positions, without a Trainer
(except the last test, which runs a Trainer on a task of its own)."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_helpers import rows

from structlin_lab.data import TensorImageLoader
from structlin_lab.train import load_config
from structlin_lab.train.build import DataShapes
from structlin_lab.train.tasks import (
    BatchResult,
    Evaluation,
    ImageClassification,
    LanguageModeling,
    mixup_accuracy,
    soft_cross_entropy,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- loss and accuracy
def test_soft_cross_entropy_is_smoothed_and_mixed_cross_entropy():
    logits = torch.randn(64, 7, generator=_gen(1)) * 3
    y = torch.randint(0, 7, (64,), generator=_gen(2))
    y2 = torch.randint(0, 7, (64,), generator=_gen(3))
    one_hot = F.one_hot(y, 7).float()
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot), F.cross_entropy(logits, y))
    smooth = one_hot * 0.7 + 0.3 / 7
    ref = F.cross_entropy(logits, y, label_smoothing=0.3)
    torch.testing.assert_close(soft_cross_entropy(logits, smooth), ref)
    # mixup: the targets' convex combination gives the lambda-weighted sum of both losses
    lam = 0.35
    mixed = lam * one_hot + (1 - lam) * F.one_hot(y2, 7).float()
    ref = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y2)
    torch.testing.assert_close(soft_cross_entropy(logits, mixed), ref)


def test_mixup_accuracy_is_the_larger_of_the_two_batch_accuracies():
    logits = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    y_a = torch.tensor([0, 1, 2, 4])  # 3/4 correct
    y_b = torch.tensor([0, 0, 0, 0])  # 1/4 correct
    assert mixup_accuracy(logits, y_a, y_b).item() == pytest.approx(0.75)
    assert mixup_accuracy(logits, y_b, y_a).item() == pytest.approx(0.75)
    # per sample, every prediction matches y_a or y_c (that would be 1.0); per batch it is 3/4
    y_c = torch.tensor([4, 4, 4, 3])
    assert mixup_accuracy(logits, y_a, y_c).item() == pytest.approx(0.75)
    assert mixup_accuracy(logits, y_a, y_a).item() == pytest.approx(0.75)


# ---------------------------------------------------------------------------- images
def _image_task(seed: int = 0, mixup: float = 0.8) -> ImageClassification:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 40)
    common = {"device": "cpu", "mean": (0.5,) * 3, "std": (0.25,) * 3, "num_classes": 4}
    train = TensorImageLoader(
        images[:24],
        labels[:24],
        batch_size=8,
        train=True,
        augment=True,
        mixup_alpha=mixup,
        label_smoothing=0.1,
        seed=seed,
        **common,
    )
    val = TensorImageLoader(
        images[24:],
        labels[24:],
        batch_size=5,
        train=False,
        augment=False,
        mixup_alpha=0.0,
        label_smoothing=0.0,
        **common,
    )
    return ImageClassification(
        train, val, num_classes=4, image_shape=(3, 8, 6), device=torch.device("cpu")
    )


def _linear_forward(seed: int = 0):
    w = torch.randn(3 * 8 * 6, 4, generator=_gen(seed))
    return lambda x: x.flatten(1) @ w


def test_image_task_shapes_and_example_input():
    task = _image_task()
    assert task.shapes == DataShapes(4, (3, 8, 6))
    assert task.steps_per_epoch == 3  # 24 images, batches of 8
    assert task.example_input().shape == (1, 3, 8, 6)


def test_image_task_resumes_its_data_position_across_epochs():
    task = _image_task()
    first = [b.x for b in itertools.islice(task.train_batches(), 4)]  # past the first epoch
    state = task.state_dict()
    more = [b.x for b in itertools.islice(task.train_batches(), 5)]
    again = _image_task(seed=0)
    again.load_state_dict(state)
    resumed = [b.x for b in itertools.islice(again.train_batches(), 5)]
    assert all(torch.equal(a, b) for a, b in zip(more, resumed, strict=True))
    assert not torch.equal(first[0], more[0])


def test_image_task_loss_accuracy_and_evaluation():
    task, forward = _image_task(), _linear_forward()
    batch = next(task.train_batches())
    result = task.loss_and_accuracy(forward, batch)
    assert isinstance(result, BatchResult) and result.examples == 8
    logits = forward(batch.x)
    torch.testing.assert_close(result.loss, soft_cross_entropy(logits, batch.targets))
    assert result.accuracy == mixup_accuracy(logits, batch.y_a, batch.y_b).item()
    # evaluation: cross-entropy and top-1 accuracy per validation image, all 16 of them
    xs, ys = zip(*((b.x, b.labels) for b in task.val), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(y) == 16
    ev = task.evaluate(forward)
    assert isinstance(ev, Evaluation)
    assert ev.loss == pytest.approx(F.cross_entropy(forward(x), y).item(), rel=1e-6)
    assert ev.accuracy == pytest.approx((forward(x).argmax(-1) == y).float().mean().item())


# ---------------------------------------------------------------------------- text
def _text_task(seed: int = 0) -> LanguageModeling:
    tokens = (np.arange(500) % 13).astype(np.uint16)  # next token = (token + 1) mod 13
    return LanguageModeling(
        tokens[:400],
        tokens[400:],
        vocab_size=13,
        batch_size=4,
        block_size=6,
        eval_batches=3,
        seed=seed,
        steps_per_epoch=16,
        device=torch.device("cpu"),
    )


def _successor_forward(confidence: float):
    """A 'model' predicting token + 1 (mod 13) with the given logit margin."""
    return lambda x: (confidence * F.one_hot((x + 1) % 13, 13).float(), None)


def test_language_modeling_batches_resume_and_shapes():
    task = _text_task()
    assert task.shapes == DataShapes(13) and task.shapes.image_shape is None
    assert task.example_input().shape == (1, 6) and task.example_input().dtype == torch.long
    x, y = next(task.train_batches())
    assert x.shape == y.shape == (4, 6)
    assert torch.equal(y, (x + 1) % 13)  # y holds each position's next token
    state = task.state_dict()
    more = list(itertools.islice(task.train_batches(), 3))
    again = _text_task(seed=99)
    again.load_state_dict(state)
    resumed = list(itertools.islice(again.train_batches(), 3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(more, resumed, strict=True))


def test_language_modeling_loss_accuracy_and_evaluation():
    task = _text_task()
    batch = next(task.train_batches())
    sure = task.loss_and_accuracy(_successor_forward(30.0), batch)
    assert sure.accuracy == 1.0 and sure.examples == 4 and sure.loss.item() < 1e-6
    flat = task.loss_and_accuracy(_successor_forward(0.0), batch)
    assert flat.loss.item() == pytest.approx(np.log(13), rel=1e-6)
    ev = task.evaluate(_successor_forward(2.0))
    expected = -F.log_softmax(torch.tensor([2.0] + [0.0] * 12), 0)[0].item()
    assert ev.loss == pytest.approx(expected, rel=1e-6) and ev.accuracy == 1.0
    assert task.evaluate(_successor_forward(2.0)) == ev  # the same batches every time
    wrong = task.evaluate(lambda x: (F.one_hot(x % 13, 13).float(), None))  # predicts "same"
    assert wrong.accuracy == 0.0


# ---------------------------------------------------------------------------- the trainer
class _Parity:
    """A task of its own: is the sum of 4 bits odd? (The trainer knows only the protocol.)"""

    shapes = DataShapes(2, (1, 2, 2))
    steps_per_epoch = 5

    def __init__(self):
        self.generator = _gen(0)
        self.evaluations = 0

    def example_input(self):
        return torch.zeros(1, 1, 2, 2)

    def _draw(self, generator, n=16):
        x = torch.randint(0, 2, (n, 1, 2, 2), generator=generator).float()
        return x, x.sum((1, 2, 3)).long() % 2

    def train_batches(self):
        while True:
            yield self._draw(self.generator)

    def loss_and_accuracy(self, forward, batch):
        x, y = batch
        logits = forward(x)
        acc = (logits.argmax(-1) == y).float().mean().item()
        return BatchResult(F.cross_entropy(logits, y), acc, len(y))

    def evaluate(self, forward):
        self.evaluations += 1
        x, y = self._draw(_gen(1), 64)
        logits = forward(x)
        return Evaluation(F.cross_entropy(logits, y).item(), 0.5)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def test_the_trainer_runs_any_task(tmp_path, monkeypatch):
    import structlin_lab.train.trainer as trainer_module

    task = _Parity()
    monkeypatch.setattr(trainer_module, "build_task", lambda *a: task)
    cfg = load_config(
        None,
        [
            "model.name=mlp",
            "model.width=16",
            "model.base_width=16",
            "model.depth=1",
            "train.epochs=2",
            "train.eval_every=5",
            "train.progress=false",
        ],
    )
    result = trainer_module.Trainer(cfg, tmp_path / "run", log=None).fit()
    assert result["status"] == "finished" and result["step"] == 10  # 2 epochs of 5 steps
    assert task.evaluations == 2
    r = rows(tmp_path / "run")
    assert [x["epoch"] for x in r] == [1.0, 2.0] and [x["test_acc"] for x in r] == [0.5, 0.5]
    assert r[-1]["samples"] == 160 and r[-1]["forward_macs_per_example"] > 0
