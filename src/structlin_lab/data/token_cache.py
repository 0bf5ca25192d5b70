"""The token cache: tokenised corpora stored as raw ``uint16`` files and memory-mapped back.

A cache folder ``<cache_dir>/text/<name>-<tokenizer>-<key>/`` holds ``train.bin`` and ``val.bin``
(the token ids as raw ``uint16``, nanoGPT style) and ``meta.json`` (the tokenizer,
the source, and the character and token counts). The key hashes everything the tokens depend on,
so a later call with the same inputs only memory-maps the files. Folders are built under a
temporary name and renamed into place, so readers and concurrent writers only ever see a complete
cache; a damaged one is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch

from ..download import cache_dir as _cache_dir
from .tokenizers import CharTokenizer, load_gpt2

if TYPE_CHECKING:
    import tiktoken

__all__ = [
    "MAX_VOCAB",
    "Codec",
    "TextData",
    "TokenWriter",
    "build",
    "cache_folder",
    "open_cached",
]

log = logging.getLogger(__name__)

# Bump when the files written for the same source and settings could change, so stale caches are
# not reused (the version is part of the cache key).
_CACHE_VERSION = 1
_TOKEN_DTYPE = np.uint16
MAX_VOCAB = int(np.iinfo(_TOKEN_DTYPE).max) + 1
_PARTS = ("train", "val")


class Codec:
    """Encode/decode under the tokenizer a token cache's meta fields describe.

    Build one with :meth:`char` or :meth:`gpt2` when tokenising, or from a cache's ``meta.json``
    when reading it back; the GPT-2 tokenizer is then loaded only when first needed.

    Args:
        meta: ``tokenizer`` (``"char"`` or ``"gpt2"``), ``chars`` (the character vocabulary, or
            None), ``vocab_size`` and, for GPT-2, ``tokenizer_file`` and ``tokenizer_sha256``
            (None for tiktoken's built-in copy).
        encoding: an already loaded GPT-2 encoding matching ``meta``.
    """

    def __init__(self, meta: dict[str, Any], encoding: tiktoken.Encoding | None = None) -> None:
        self._meta = meta
        self._char = CharTokenizer(meta["chars"]) if meta["tokenizer"] == "char" else None
        self._enc = encoding

    @classmethod
    def char(cls, chars: Iterable[str]) -> Codec:
        """A character codec whose vocabulary is the distinct ``chars``."""
        tok = CharTokenizer(chars)
        return cls({"tokenizer": "char", "chars": tok.chars, "vocab_size": tok.vocab_size})

    @classmethod
    def gpt2(cls, path: Path | None, sha: str | None) -> Codec:
        """The GPT-2 codec of a :func:`gpt2_file_key` result, loaded now."""
        enc = load_gpt2(path, sha)
        meta = {
            "tokenizer": "gpt2",
            "chars": None,
            "vocab_size": enc.n_vocab,
            "tokenizer_file": None if path is None else str(path),
            "tokenizer_sha256": sha,
        }
        return cls(meta, enc)

    @property
    def meta(self) -> dict[str, Any]:
        """The tokenizer fields of a cache's ``meta.json``."""
        return dict(self._meta)

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return int(self._meta["vocab_size"])

    def _gpt2(self) -> tiktoken.Encoding:
        if self._enc is None:
            file = self._meta.get("tokenizer_file")
            sha = self._meta.get("tokenizer_sha256")
            self._enc = load_gpt2(None if file is None else Path(file), sha)
        return self._enc

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as int64; ``"<|endoftext|>"`` in the text is plain text."""
        if self._char is not None:
            return self._char.encode_array(text)
        return np.asarray(self._gpt2().encode_ordinary(text), dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each of ``texts`` (GPT-2 spreads them over threads)."""
        if self._char is not None:
            return [self._char.encode(t) for t in texts]
        return self._gpt2().encode_ordinary_batch(texts)

    def decode(self, ids: np.ndarray) -> str:
        """The text of 1-D int64 token ids."""
        if self._char is not None:
            return self._char.decode(ids)
        return self._gpt2().decode(ids.tolist())


# eq=False: dataclass equality would compare arrays elementwise and raise on truth testing.
@dataclass(frozen=True, eq=False)
class TextData:
    """A tokenised text corpus, memory-mapped from its cache folder.

    Attributes:
        train: training tokens, a read-only ``uint16`` ``np.memmap`` (a plain empty array if none).
        val: validation tokens, likewise.
        vocab_size: number of distinct token ids (the model's embedding size).
        tokenizer: ``"char"`` or ``"gpt2"``.
        meta: the cache folder's ``meta.json``: source, tokenizer, character and token counts.
        path: the cache folder holding ``train.bin``, ``val.bin`` and ``meta.json``.
    """

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer: str
    meta: dict[str, Any]
    path: Path
    _codec: Codec = field(repr=False)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` under this corpus's tokenizer."""
        return self._codec.encode_array(text).tolist()

    def decode(self, ids: Iterable[int] | np.ndarray | torch.Tensor) -> str:
        """The text of token ids ``ids`` (e.g. a model's samples)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        return self._codec.decode(np.asarray(ids, dtype=np.int64).reshape(-1))

    def __repr__(self) -> str:
        return (
            f"TextData(tokenizer={self.tokenizer!r}, vocab_size={self.vocab_size}, "
            f"train={len(self.train)}, val={len(self.val)})"
        )


class TokenWriter:
    """Appends token ids to a cache's ``train.bin`` / ``val.bin`` and counts them."""

    def __init__(self, train: IO[bytes], val: IO[bytes]) -> None:
        self._files = {"train": train, "val": val}
        self.tokens = dict.fromkeys(_PARTS, 0)

    def write(self, part: str, ids: np.ndarray) -> None:
        """Append integer ``ids`` to ``part`` (``"train"`` or ``"val"``) as ``uint16``."""
        if ids.size and ids.max() >= MAX_VOCAB:
            raise ValueError(f"token id {ids.max()} does not fit uint16")
        self._files[part].write(ids.astype(_TOKEN_DTYPE).tobytes())
        self.tokens[part] += int(ids.size)


def cache_folder(root: str | Path | None, name: str, tokenizer: str, key: list[Any]) -> Path:
    """``<root>/text/<name>-<tokenizer>-<hash of key>``; ``root`` defaults as in
    :func:`structlin_lab.download.cache_dir`. ``key`` must be JSON-serialisable."""
    digest = hashlib.sha256(json.dumps([_CACHE_VERSION, *key]).encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:48]
    return _cache_dir(root) / "text" / f"{stem}-{tokenizer}-{digest}"


def _map(path: Path, n: int) -> np.ndarray:
    if n:
        return np.memmap(path, dtype=_TOKEN_DTYPE, mode="r")
    # np.memmap cannot map an empty file.
    empty = np.empty(0, dtype=_TOKEN_DTYPE)
    empty.flags.writeable = False
    return empty


def open_cached(folder: Path) -> TextData | None:
    """The corpus cached in ``folder``; None if there is none, or it is stale or damaged."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("version") != _CACHE_VERSION:
            return None
        arrays = {}
        for part in _PARTS:
            n = int(meta[f"{part}_tokens"])
            if (folder / f"{part}.bin").stat().st_size != n * np.dtype(_TOKEN_DTYPE).itemsize:
                raise ValueError(f"{part}.bin does not hold the {n} tokens meta.json records")
            arrays[part] = _map(folder / f"{part}.bin", n)
        return TextData(
            **arrays,
            vocab_size=int(meta["vocab_size"]),
            tokenizer=str(meta["tokenizer"]),
            meta=meta,
            path=folder,
            _codec=Codec(meta),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        # A damaged cache is only a lost shortcut: the caller tokenises again and replaces it.
        log.warning("ignoring unusable token cache %s: %s", folder, e)
        return None


def build(folder: Path, write: Callable[[TokenWriter], dict[str, Any]]) -> TextData:
    """Fill a fresh cache folder and move it into place.

    ``write(writer)`` writes the tokens through ``writer`` and returns the metadata; the token
    counts and the cache version are added to it. Nothing is left behind if it raises.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        with open(tmp / "train.bin", "xb") as train_f, open(tmp / "val.bin", "xb") as val_f:
            writer = TokenWriter(train_f, val_f)
            meta = write(writer)
        counts = {f"{part}_tokens": n for part, n in writer.tokens.items()}
        meta = {"version": _CACHE_VERSION, **meta, **counts}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _move_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    data = open_cached(folder)
    if data is None:
        raise RuntimeError(f"the token cache {folder} just written could not be read back")
    return data


def _move_into_place(tmp: Path, folder: Path) -> None:
    if folder.exists():
        # Only reached when the existing folder failed to open: move it aside, then delete.
        trash = tmp.with_name(tmp.name + ".old")
        with contextlib.suppress(FileNotFoundError):
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:
        # Another process finished the same cache first; its result is equivalent.
        if open_cached(folder) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
