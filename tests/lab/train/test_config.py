import math

import pytest
import torch

from structlin_lab.train.checkpoint import load_checkpoint, save_checkpoint
from structlin_lab.train.config import Config, apply_overrides, config_hash, load_config
from structlin_lab.train.schedule import lr_factor


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_build_typed_config(tmp_path):
    p = write(tmp_path, "name: x\nmodel: {width: 128}\noptim: {lr: 0.001}\ntrain: {steps: 10}\n")
    c = load_config(
        p,
        ["optim.lr=3e-4", "model.depth=2", "structure.spec=btt:rank=2", "optim.betas=[0.9, 0.95]"],
    )
    assert c.model.width == 128 and c.model.depth == 2
    assert c.optim.lr == pytest.approx(3e-4) and isinstance(c.optim.lr, float)
    assert c.structure.spec == "btt:rank=2" and c.optim.betas == (0.9, 0.95)
    assert Config.from_dict(c.to_dict()) == c


def test_unknown_keys_suggest_the_closest(tmp_path):
    p = write(tmp_path, "optim: {lrr: 0.1}\ntrain: {steps: 1}\n")
    with pytest.raises(ValueError, match=r"unknown config key 'optim.lrr'; did you mean 'lr'"):
        load_config(p)
    with pytest.raises(ValueError, match="did you mean 'model'"):
        load_config(None, ["modle.width=3", "train.steps=1"])


def test_type_and_consistency_errors(tmp_path):
    with pytest.raises(ValueError, match="expects an integer"):
        load_config(None, ["model.width=wide", "train.steps=1"])
    with pytest.raises(ValueError, match=r"exactly one of train\.steps and train\.epochs"):
        load_config(None, [])
    with pytest.raises(ValueError, match=r"optim\.name"):
        load_config(None, ["train.steps=1", "optim.name=lion"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["nonsense"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_config_hash_ignores_logging_but_not_training_keys():
    a = load_config(None, ["train.steps=10"])
    b = load_config(None, ["train.steps=10", "train.eval_every=3", "train.progress=false"])
    c = load_config(None, ["train.steps=10", "optim.lr=1e-2"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_schedule_warmup_cosine_and_linear():
    f = lr_factor("cosine", total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(110) == pytest.approx(0.1)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    g = lr_factor("linear", total_steps=10)
    assert g(5) == pytest.approx(0.5) and lr_factor("constant", 10)(7) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor("step", 10)


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint(path, {"a": torch.ones(2)})

    def boom(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"a": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt")


def test_compile_mode_is_validated_and_plumbed(tmp_path):
    p = write(tmp_path, "train: {steps: 1, compile: true, compile_mode: reduce-overhead}\n")
    c = load_config(p)
    assert c.train.compile_mode == "reduce-overhead"
    assert Config.from_dict(c.to_dict()) == c
    assert load_config(None, ["train.steps=1"]).train.compile_mode == "default"
    with pytest.raises(ValueError, match="captures CUDA graphs and needs a CUDA device"):
        load_config(p, ["train.device=cpu"])
    with pytest.raises(ValueError, match=r"needs train\.compile=true"):
        load_config(p, ["train.compile=false"])
    with pytest.raises(ValueError, match="must be one of default, reduce-overhead"):
        load_config(p, ["train.compile_mode=reduce_overhead"])
    cpu_ok = load_config(p, ["train.device=cpu", "train.compile_mode=max-autotune-no-cudagraphs"])
    assert cpu_ok.train.compile_mode == "max-autotune-no-cudagraphs"


def test_auto_device_resolving_to_cpu_rejects_cuda_graphs():
    """``device: auto`` passes the config check; the trainer checks again with the real device."""
    from structlin_lab.train.config import check_compile_mode

    c = load_config(
        None, ["train.steps=1", "train.compile=true", "train.compile_mode=max-autotune"]
    )
    check_compile_mode(c.train, "auto")
    check_compile_mode(c.train, "cuda:1")
    with pytest.raises(ValueError, match="needs a CUDA device; the device is 'cpu'"):
        check_compile_mode(c.train, "cpu")


def _draws():
    import random

    import numpy as np

    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())  # noqa: NPY002


def test_rng_state_is_plain_and_restores_every_generator(tmp_path):
    from structlin_lab.train.checkpoint import capture_rng, restore_rng

    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"rng": capture_rng()})
    first = _draws()
    state = torch.load(path, weights_only=True)["rng"]  # plain: no NumPy object pickled
    restore_rng(state)
    assert _draws() == first


def test_checkpoint_numpy_values_are_stored_plain(tmp_path):
    import numpy as np

    path = tmp_path / "c.pt"
    save_checkpoint(
        path, {"a": np.arange(3), "b": np.float32(0.5), "c": (np.int64(2), [np.ones(2)])}
    )
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["a"], torch.arange(3)) and state["b"] == 0.5
    assert state["c"][0] == 2 and type(state["c"][0]) is int
    assert torch.equal(state["c"][1][0], torch.ones(2, dtype=torch.float64))


def test_old_checkpoint_with_numpy_rng_is_still_read(tmp_path):
    import numpy as np

    from structlin_lab.train.checkpoint import restore_rng

    np.random.seed(3)  # noqa: NPY002
    old = {"python": __import__("random").getstate(), "numpy": np.random.get_state()}  # noqa: NPY002
    old["torch"] = torch.get_rng_state()
    path = tmp_path / "old.pt"
    torch.save({"step": 5, "rng": old}, path)  # the format before checkpoints were plain
    first = _draws()
    state = load_checkpoint(path)
    assert state["step"] == 5
    restore_rng(state["rng"])
    assert _draws() == first


class _Foreign:
    pass


def test_a_checkpoint_pickling_other_objects_is_refused(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"x": _Foreign()}, path)
    with pytest.raises(ValueError, match=r"weights_only=True.*_Foreign"):
        load_checkpoint(path)


def test_warmup_longer_than_the_run_warns_with_the_peak_it_reaches():
    with pytest.warns(UserWarning, match=r"warmup_steps=300 is not shorter than the run \(30 "):
        f = lr_factor("cosine", 30, warmup_steps=300)
    assert f(29) == pytest.approx(
        0.1
    )  # the last step's LR: 30/300 of the peak, as the warning says
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -1"):
        lr_factor("cosine", 30, warmup_steps=-1)
