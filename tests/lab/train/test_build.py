"""shapes_only: the data shapes a model needs, read from the config alone."""

import pytest

from structlin_lab.train import load_config
from structlin_lab.train.build import shapes_only


@pytest.mark.parametrize(
    ("sets", "kind", "classes", "shape"),
    [
        (["data.name=cifar100"], "image", 100, (3, 32, 32)),
        (["data.name=fashion_mnist"], "image", 10, (1, 28, 28)),
        (
            ["data.name=imagenet", "model.name=vit", "model.kwargs={image_size: 64}"],
            "image",
            1000,
            (3, 64, 64),
        ),
        (["task=lm", "model.name=gpt2", "data.tokenizer=gpt2"], "text", 50257, None),
    ],
)
def test_shapes_from_the_config(sets, kind, classes, shape):
    data = shapes_only(load_config(None, ["train.steps=1", *sets]))
    assert data.kind == kind and data.num_classes == classes
    assert data.train is None and data.test is None
    if shape is not None:
        assert data.image_shape == shape


def test_char_vocabulary_is_unknown_unless_given():
    cfg = load_config(None, ["train.steps=1", "task=lm", "model.name=gpt2", "data.tokenizer=char"])
    assert shapes_only(cfg) is None
    assert shapes_only(cfg, vocab=65).num_classes == 65
