"""Training: typed configs, the trainer loop, checkpoints and schedules."""

from .config import Config, apply_overrides, config_hash, load_config
from .trainer import Trainer, TrainingDiverged

__all__ = ["Config", "Trainer", "TrainingDiverged", "apply_overrides", "config_hash", "load_config"]
