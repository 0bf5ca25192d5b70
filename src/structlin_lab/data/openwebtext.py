"""OpenWebText tokenised with GPT-2, streamed from the Hugging Face Hub into the token cache.

nanoGPT's recipe: every document is followed by ``<|endoftext|>``, and documents go to
validation at random with probability ``val_fraction`` (drawn from a fixed seed, so the split is
reproducible). The full corpus is ~9 B tokens (~17 GB of ``uint16``) and takes hours.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .token_cache import Codec, TextData, TokenWriter, build, cache_folder, open_cached
from .tokenizers import GPT2_EOT, gpt2_file_key

__all__ = ["load_openwebtext"]

log = logging.getLogger(__name__)

_DATASET = "Skylion007/openwebtext"
# nanoGPT's seed for its train/val split; part of the cache key.
_SPLIT_SEED = 2357
# Documents tokenised per call (tiktoken spreads a batch over threads).
_BATCH_DOCUMENTS = 1024


def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "load_openwebtext needs Hugging Face datasets: pip install datasets "
            "(or tokenise a local file with prepare_text)"
        ) from e
    return datasets


def load_openwebtext(
    cache_dir: str | Path | None = None,
    *,
    tokenizer_file: str | Path | None = None,
    val_fraction: float = 0.0005,
    max_documents: int | None = None,
) -> TextData:
    """OpenWebText tokenised with GPT-2 (see the module docstring), cached like ``prepare_text``.

    Args:
        cache_dir: where the cache folder goes (default as in ``prepare_text``).
        tokenizer_file: a local GPT-2 ranks file; see ``gpt2_encoding``.
        val_fraction: probability that a document is held out; in [0, 1).
        max_documents: stop after this many documents (``None``: all), for quick experiments.

    Returns:
        The tokenised corpus.

    Raises:
        ImportError: Hugging Face ``datasets`` (or tiktoken) is not installed.
        ValueError: bad ``val_fraction`` / ``max_documents``.
    """
    datasets = _require_datasets()
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1); got {val_fraction}")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be positive or None; got {max_documents}")
    tok_path, tok_sha = gpt2_file_key(tokenizer_file)
    key = ["hf", _DATASET, max_documents, val_fraction, _SPLIT_SEED, tok_sha]
    folder = cache_folder(cache_dir, "openwebtext", "gpt2", key)
    data = open_cached(folder)
    if data is not None:
        return data

    def write(writer: TokenWriter) -> dict[str, Any]:
        codec = Codec.gpt2(tok_path, tok_sha)
        stream = datasets.load_dataset(_DATASET, split="train", streaming=True)
        texts = (example["text"] for example in itertools.islice(stream, max_documents))
        docs = _write_documents(writer, codec, texts, val_fraction)
        return {
            **codec.meta,
            "source": {"dataset": _DATASET, "max_documents": max_documents, "seed": _SPLIT_SEED},
            "val_fraction": val_fraction,
            "train_documents": docs["train"],
            "val_documents": docs["val"],
        }

    log.info("streaming and tokenising %s into %s", _DATASET, folder)
    return build(folder, write)


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _write_documents(
    writer: TokenWriter, codec: Codec, texts: Iterable[str], val_fraction: float
) -> dict[str, int]:
    """Tokenise ``texts``, each followed by ``<|endoftext|>``, into a random train/val split;
    return the number of documents in each part."""
    # One uniform per document, in order, so the split does not depend on the batching.
    rng = np.random.default_rng(_SPLIT_SEED)
    docs = {"train": 0, "val": 0}
    for batch in _batched(texts, _BATCH_DOCUMENTS):
        held_out = rng.random(len(batch)) < val_fraction
        for ids, is_val in zip(codec.encode_batch(batch), held_out, strict=True):
            part = "val" if is_val else "train"
            writer.write(part, np.asarray([*ids, GPT2_EOT], dtype=np.int64))
            docs[part] += 1
    return docs
