"""Dataset loaders that return plain numpy arrays, decoded once and cached on disk."""

from .cifar import CifarArrays, load_cifar
from .fashion_mnist import FashionMnistArrays, load_fashion_mnist
from .imagenet import ImageFolder, imagenet_loader
from .loader import ImageBatch, TensorImageLoader
from .stream import StreamingImageBatches
from .text import CharTokenizer, TextData, get_batch, gpt2_encoding, load_openwebtext, prepare_text

__all__ = [
    "CharTokenizer",
    "CifarArrays",
    "FashionMnistArrays",
    "ImageBatch",
    "ImageFolder",
    "StreamingImageBatches",
    "TensorImageLoader",
    "TextData",
    "get_batch",
    "gpt2_encoding",
    "imagenet_loader",
    "load_cifar",
    "load_fashion_mnist",
    "load_openwebtext",
    "prepare_text",
]
