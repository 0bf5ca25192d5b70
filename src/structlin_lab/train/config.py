"""Typed training configuration: dataclasses, YAML files and ``--set key=value`` overrides.

A config is plain data: it is read with ``yaml.safe_load`` (never executed), checked against the
dataclass fields (an unknown key is an error that suggests the closest valid one), and can be
overridden from the command line with dotted keys, ``--set optim.lr=1e-3 model.width=256``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from structlin.options import suggest

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "StructureConfig",
    "TrainConfig",
    "apply_overrides",
    "config_hash",
    "load_config",
]


@dataclass
class ModelConfig:
    """Which model family and size. ``width`` is the main knob; ``base_width`` drives μP."""

    name: str = "mlp"
    width: int = 64
    base_width: int = 64
    depth: int = 3
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StructureConfig:
    """How linear layers are replaced (``structlin.structurize``); ``spec="dense"`` keeps them."""

    spec: str = "dense"
    target_modules: Any = "all-linear"
    exclude_modules: Any = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Data set and batching. ``source`` is a local copy (archive or folder) of the data set."""

    name: str = "cifar10"
    source: str | None = None
    root: str | None = None
    download: bool = False
    batch_size: int = 1024
    eval_batch_size: int = 1024
    augment: bool = True
    mixup: float = 0.8
    label_smoothing: float = 0.3
    # language modelling
    tokenizer: str = "char"
    tokenizer_file: str | None = None
    block_size: int = 128
    eval_batches: int = 20
    # streamed image folders (ImageNet)
    num_workers: int = 4


@dataclass
class OptimConfig:
    """Optimizer (learning rates come from ``structlin.mup.param_groups``) and schedule."""

    name: str = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.0
    lr_rule: str = "structure-aware"
    multipliers: dict[str, float] = field(default_factory=dict)
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    clip: float = 0.0


@dataclass
class TrainConfig:
    """Loop control. Exactly one of ``steps`` and ``epochs`` sets the length."""

    steps: int | None = None
    epochs: float | None = None
    eval_every: int = 100
    ckpt_every: int = 500  # 0: never write checkpoints (the run cannot be resumed)
    seed: int = 0
    device: str = "auto"
    autocast: str = "auto"  # "auto" = bf16 on CUDA, off elsewhere; or "bf16", "off"
    compile: bool = False
    # torch.compile mode when compile is on; "reduce-overhead" replays CUDA graphs (CUDA only)
    compile_mode: str = "default"
    # under torchrun: "ddp" replicates the model, "fsdp" shards it (FSDP2; .distributed)
    distributed: str = "ddp"
    tensorboard: bool = False
    progress: bool = True


@dataclass
class Config:
    """A whole experiment."""

    name: str = "run"
    task: str = "classify"  # "classify" (images) or "lm" (text)
    model: ModelConfig = field(default_factory=ModelConfig)
    structure: StructureConfig = field(default_factory=StructureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _build(cls, data, "")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or '<root>'!r} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            path = f"{where}.{key}" if where else key
            raise ValueError(
                f"unknown config key {path!r}{suggest(key, names)} "
                f"(valid keys{' in ' + where if where else ''}: {', '.join(names)})"
            )
        hint = hints[key]
        sub = hint if dataclasses.is_dataclass(hint) else None
        if sub is not None:
            kwargs[key] = _build(sub, value, f"{where}.{key}" if where else key)
        else:
            kwargs[key] = _coerce(value, hint, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    text = str(hint)
    if value is None:
        return None
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"config key {path!r} expects true/false, got {value!r}")
    if hint is int or text == "int | None":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"config key {path!r} expects an integer, got {value!r}")
        return value
    if hint is float or text == "float | None":
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"config key {path!r} expects a number, got {value!r}")
        return float(value)
    if text.startswith("tuple"):
        if not isinstance(value, list | tuple):
            raise ValueError(f"config key {path!r} expects a list, got {value!r}")
        return tuple(value)
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``["optim.lr=1e-3", "model.width=256"]`` to a nested dict (values parsed as YAML)."""
    import yaml

    out = json.loads(json.dumps(data))
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{p}: a config file must contain a mapping at the top level")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    config = Config.from_dict(data)
    _validate(config)
    return config


def _validate(c: Config) -> None:
    if (c.train.steps is None) == (c.train.epochs is None):
        raise ValueError("set exactly one of train.steps and train.epochs")
    if c.task not in ("classify", "lm"):
        raise ValueError(f"task must be 'classify' or 'lm', got {c.task!r}")
    if c.optim.name.lower() not in ("adam", "adamw", "sgd"):
        raise ValueError(f"optim.name must be adam, adamw or sgd, got {c.optim.name!r}")
    if c.optim.schedule not in ("cosine", "constant", "linear"):
        raise ValueError(
            f"optim.schedule must be cosine, linear or constant, got {c.optim.schedule!r}"
        )
    if c.data.batch_size < 1:
        raise ValueError(f"data.batch_size must be positive, got {c.data.batch_size}")
    if c.train.eval_every < 1:
        raise ValueError(
            f"train.eval_every must be a positive step count, got {c.train.eval_every}"
        )
    check_compile_mode(c.train, c.train.device)
    if c.train.distributed not in DISTRIBUTED_MODES:
        raise ValueError(
            f"train.distributed must be one of {', '.join(DISTRIBUTED_MODES)}; got "
            f"{c.train.distributed!r}{suggest(c.train.distributed, DISTRIBUTED_MODES)}"
        )
    if c.train.ckpt_every < 0:
        raise ValueError(
            f"train.ckpt_every must be a step count, or 0 for no checkpoints; got "
            f"{c.train.ckpt_every}"
        )


#: ``train.distributed`` values (:mod:`.distributed`).
DISTRIBUTED_MODES = ("ddp", "fsdp")
#: ``train.compile_mode`` values: ``torch.compile``'s modes.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Modes that capture CUDA graphs, so they need a CUDA device.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile_mode(train: TrainConfig, device: str) -> None:
    """Validate ``train.compile_mode`` against ``train.compile`` and the device type (``"auto"``
    is checked again by the trainer once the device is known)."""
    mode = train.compile_mode
    if mode not in COMPILE_MODES:
        raise ValueError(
            f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}; got {mode!r}"
            f"{suggest(mode, COMPILE_MODES)}"
        )
    if mode != "default" and not train.compile:
        raise ValueError(f"train.compile_mode={mode} needs train.compile=true")
    if (
        mode in CUDA_GRAPH_MODES
        and device not in ("auto", "cuda")
        and not device.startswith("cuda:")
    ):
        raise ValueError(
            f"train.compile_mode={mode} captures CUDA graphs and needs a CUDA device; the device "
            f"is {device!r}. Use compile_mode=default (or max-autotune-no-cudagraphs) here."
        )


def config_hash(config: Config) -> str:
    """Hash of everything that changes the training trajectory (evaluation, checkpoint and
    logging settings are excluded: changing them does not change the weights)."""
    d = config.to_dict()
    for key in ("eval_every", "ckpt_every", "progress", "tensorboard"):
        d["train"].pop(key, None)
    d["data"].pop("eval_batches", None)
    d["data"].pop("eval_batch_size", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
