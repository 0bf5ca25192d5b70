"""Training: typed configs, the trainer loop, its tasks (image classification, language
modelling), checkpoints and schedules."""

from .config import Config, apply_overrides, config_hash, load_config
from .tasks import ImageClassification, LanguageModeling, Task, build_task
from .trainer import CheckpointError, Trainer, TrainingDiverged

__all__ = [
    "CheckpointError",
    "Config",
    "ImageClassification",
    "LanguageModeling",
    "Task",
    "Trainer",
    "TrainingDiverged",
    "apply_overrides",
    "build_task",
    "config_hash",
    "load_config",
]
