"""The lab's data sets: small image sets as numpy arrays with an on-device loader, ImageNet-style
folders streamed through DataLoader workers, and text tokenised once into ``uint16`` token caches.

Everything other packages use is exported here; import it from ``structlin_lab.data``.
"""

from .batches import get_batch
from .cifar import CifarArrays, load_cifar
from .fashion_mnist import FashionMnistArrays, load_fashion_mnist
from .imagenet import IMAGENET_MEAN_255, IMAGENET_STD_255, ImageFolder, imagenet_loader
from .loader import ImageBatch, TensorImageLoader
from .openwebtext import load_openwebtext
from .stream import StreamingImageBatches
from .text import prepare_text
from .token_cache import TextData
from .tokenizers import GPT2_VOCAB_SIZE, CharTokenizer, gpt2_encoding

__all__ = [
    "GPT2_VOCAB_SIZE",
    "IMAGENET_MEAN_255",
    "IMAGENET_STD_255",
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
