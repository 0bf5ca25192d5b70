"""Get a trained model back from a run directory, and export it in ``save_structured``'s format.

A run directory (written by :class:`~structlin_lab.train.Trainer`) holds ``config.yaml`` and
``checkpoints/last.pt``; the checkpoint holds only tensors and plain values, so it loads with
``torch.load(path, weights_only=True)``. :func:`load_run` rebuilds the run's model exactly as the
trainer built it (:func:`~structlin_lab.train.build.build_model`: the config's model at its width,
structured as configured) and loads the trained weights into it::

    model, config = load_run("runs/gpt2_austen")

:func:`export_run` writes the model with :func:`structlin.save_structured` (``structure.json``
and safetensors weights), plus ``lab_run.json``: the run's config and the data sizes the model
was built for (output width, image shape), so that :func:`load_exported` can build the dense base
and call :func:`structlin.load_structured` on it. Any dense model of the same architecture works
as the base as well::

    dense = model_at_width(config, config.model.width, shapes)
    model = structlin.load_structured(dense, "exported/")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from structlin import load_structured, save_structured

from .train.build import DataShapes, build_model, model_at_width, shapes_only
from .train.checkpoint import load_checkpoint
from .train.config import Config

__all__ = [
    "LAB_RUN_NAME",
    "LoadedRun",
    "export_run",
    "load_exported",
    "load_run",
    "read_lab_run",
    "run_shapes",
    "write_lab_run",
]

#: The file :func:`export_run` adds beside ``structure.json``: config and data sizes.
LAB_RUN_NAME = "lab_run.json"
CHECKPOINT = Path("checkpoints") / "last.pt"


class LoadedRun(NamedTuple):
    """A trained model (in eval mode, on the device asked for), its run config and the data
    sizes it was built for."""

    model: nn.Module
    config: Config
    shapes: DataShapes


def _read_run_checkpoint(run_dir: Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no {CHECKPOINT}: not a training run directory, or it was trained "
            f"with train.ckpt_every=0 (no checkpoints)"
        )
    return load_checkpoint(path, map_location="cpu")


def _probe_shapes(cfg: Config, num_outputs: int, image_shape: Any) -> dict[str, tuple]:
    """State-dict shapes of ``cfg``'s model for ``num_outputs`` outputs, built on ``meta``."""
    with torch.device("meta"):
        model, _ = build_model(cfg, DataShapes(num_outputs, image_shape), torch.device("meta"))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def run_shapes(cfg: Config, state: dict[str, torch.Tensor]) -> DataShapes:
    """The :class:`DataShapes` a run's model was built with, from its config and weights.

    The image shape comes from the config (:func:`~structlin_lab.train.build.shapes_only`). The
    output width (classes, or the vocabulary of a character-level text, which only the text
    knows) is read off the weights: the model is built on ``meta`` with two output widths, and a
    tensor dimension that follows them (the embedding's rows, the head's outputs) gives it.
    """
    guess = shapes_only(cfg)
    image_shape = None if guess is None else guess.image_shape
    a, b = 7, 11  # two widths no other dimension of a model is likely to equal
    probe_a, probe_b = _probe_shapes(cfg, a, image_shape), _probe_shapes(cfg, b, image_shape)
    for key, shape_a in probe_a.items():
        shape_b = probe_b.get(key)
        if key not in state or shape_b is None or len(shape_b) != len(shape_a):
            continue
        for dim, pair in enumerate(zip(shape_a, shape_b, strict=True)):
            if pair == (a, b) and state[key].dim() == len(shape_a):
                return DataShapes(int(state[key].shape[dim]), image_shape)
    raise ValueError(
        f"cannot tell the output width of model {cfg.model.name!r} from its weights: no tensor "
        f"has a dimension that follows it"
    )


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedRun:
    """The trained model of ``run_dir`` (eval mode, on ``device``), its config and data sizes.

    The model is built as the trainer built it (same config, same structure) and the
    checkpoint's weights are loaded strictly, so it computes what the trainer's model computed.

    Raises:
        FileNotFoundError: no such directory, or it has no ``checkpoints/last.pt``.
        ValueError: the checkpoint does not fit the model its config builds.
    """
    run_dir = Path(run_dir)
    ckpt = _read_run_checkpoint(run_dir)
    cfg = Config.from_dict(ckpt["config"])
    state = ckpt["model"]
    shapes = run_shapes(cfg, state)
    model, _ = build_model(cfg, shapes, torch.device("cpu"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{run_dir / CHECKPOINT} does not fit its config's model: {err}") from err
    return LoadedRun(model.to(device).eval(), cfg, shapes)


def _lab_run_dict(config: Config, shapes: DataShapes) -> dict[str, Any]:
    image = None if shapes.image_shape is None else list(shapes.image_shape)
    return {
        "config": config.to_dict(),
        "num_outputs": shapes.num_outputs,
        "image_shape": image,
    }


def write_lab_run(directory: str | os.PathLike, config: Config, shapes: DataShapes) -> Path:
    """Write ``lab_run.json`` (config and data sizes) into a ``save_structured`` directory."""
    path = Path(directory) / LAB_RUN_NAME
    path.write_text(json.dumps(_lab_run_dict(config, shapes), indent=2) + "\n")
    return path


def read_lab_run(directory: str | os.PathLike) -> tuple[Config, DataShapes]:
    """The config and data sizes that :func:`export_run` wrote into ``directory``."""
    path = Path(directory) / LAB_RUN_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {LAB_RUN_NAME}: not exported from a lab run")
    data = json.loads(path.read_text())
    image = data.get("image_shape")
    shapes = DataShapes(int(data["num_outputs"]), None if image is None else tuple(image))
    return Config.from_dict(data["config"]), shapes


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``run_dir``'s trained model to ``out_dir`` in ``save_structured``'s format (plus
    ``lab_run.json``); ``structlin.load_structured(dense_base, out_dir)`` reloads it."""
    run = load_run(run_dir)
    out = save_structured(run.model, out_dir)
    write_lab_run(out, run.config, run.shapes)
    return out


def load_exported(directory: str | os.PathLike) -> LoadedRun:
    """A model exported by :func:`export_run` (or written by ``structlin compress`` from a lab
    model): its dense base built from ``lab_run.json``, then ``structlin.load_structured``."""
    cfg, shapes = read_lab_run(directory)
    dense = model_at_width(cfg, cfg.model.width, shapes)
    return LoadedRun(load_structured(dense, directory).eval(), cfg, shapes)
