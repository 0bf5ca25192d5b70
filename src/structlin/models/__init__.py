"""Models of the paper, written with plain ``nn.Linear`` layers so that surgery applies."""

from .mlp import MLP

__all__ = ["MLP"]
