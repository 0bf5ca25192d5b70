"""Models of the paper, written with plain ``nn.Linear`` layers so that surgery applies."""

from .gpt2 import GPT2, GPTConfig
from .mlp import MLP
from .registry import create_model, list_models, register_model
from .vit import ViT

__all__ = ["GPT2", "MLP", "GPTConfig", "ViT", "create_model", "list_models", "register_model"]
