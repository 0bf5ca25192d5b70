"""Dataset loaders that return plain numpy arrays, decoded once and cached on disk."""

from .cifar import CifarArrays, load_cifar

__all__ = ["CifarArrays", "load_cifar"]
