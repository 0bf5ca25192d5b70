"""Token streams for language modelling: a text file tokenised once into cached ``uint16`` arrays.

``prepare_text`` reads a UTF-8 text file (plain or gzipped), holds out its last ``val_fraction`` of
characters for validation, tokenises both parts with a character-level or the GPT-2 BPE tokenizer
and writes ``train.bin`` / ``val.bin`` (raw ``uint16``, nanoGPT style) plus ``meta.json`` into a
cache folder. Later calls with the same source and settings memory-map those files instead of
tokenising again. ``get_batch`` draws random ``(x, y)`` windows from such an array with an explicit
``torch.Generator``, so a training run can save and restore exactly where its sampling stood.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import tiktoken

from ..download import cache_dir as _cache_dir

__all__ = [
    "GPT2_VOCAB_SIZE",
    "CharTokenizer",
    "TextData",
    "get_batch",
    "gpt2_encoding",
    "load_openwebtext",
    "prepare_text",
]

log = logging.getLogger(__name__)

# Bump when the files written for the same source and settings could change, so stale caches are
# not reused (the version is part of the cache key).
_CACHE_VERSION = 1
_TOKEN_DTYPE = np.uint16
_MAX_VOCAB = int(np.iinfo(_TOKEN_DTYPE).max) + 1
# Characters read and tokenised per step: bounds memory on large files while keeping per-call
# overhead negligible (tiktoken encodes ~1 M characters in ~0.15 s).
_CHUNK_CHARS = 1 << 20

# GPT-2 / r50k_base, as in tiktoken_ext.openai_public (which writes the same regex with possessive
# quantifiers, an equivalent form).
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_EOT = 50256
GPT2_VOCAB_SIZE = 50257
_GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_TOKENIZERS = ("char", "gpt2")

# A single space or newline between two non-space characters. Cutting the text just before it
# cannot change GPT-2 tokens: no pre-tokenizer piece spans it (pieces of non-space characters stop
# at whitespace, and a lone whitespace character is its own piece or the start of " word"), and
# the pattern has no look-behind, so the right part is split exactly as inside the whole text.
# Python's \S is never wider than the Rust regex's, so the check errs on the safe side.
_SAFE_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")


def _require_tiktoken() -> Any:
    try:
        import tiktoken
    except ImportError as e:
        raise ImportError(
            "the GPT-2 tokenizer needs tiktoken: pip install 'structlin[text]'"
        ) from e
    return tiktoken


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def gpt2_encoding(tokenizer_file: str | Path | None = None) -> tiktoken.Encoding:
    """The GPT-2 BPE tokenizer (tiktoken's ``r50k_base``: 50,257 tokens, ``<|endoftext|>`` = 50256).

    Args:
        tokenizer_file: a local GPT-2 ranks file (``gpt2.tiktoken`` / ``r50k_base.tiktoken``, one
            ``base64-token rank`` per line). Without it, tiktoken's built-in ``"gpt2"`` encoding is
            used, which downloads its vocabulary on first use (then caches it).

    Returns:
        A ``tiktoken.Encoding``; ``encode("Hello world") == [15496, 995]``.

    Raises:
        ImportError: tiktoken is not installed.
        FileNotFoundError: ``tokenizer_file`` does not exist.
        ValueError: ``tokenizer_file`` does not hold 50,256 ranks numbered 0..50255.
        RuntimeError: no ``tokenizer_file`` and tiktoken could not fetch its own copy (offline).
    """
    tiktoken = _require_tiktoken()
    if tokenizer_file is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # network errors surface as requests/urllib/OS errors, or others
            raise RuntimeError(
                f"could not load tiktoken's GPT-2 encoding ({type(e).__name__}: {e}); tiktoken "
                "downloads it on first use, so offline pass tokenizer_file=<path to the GPT-2 "
                "ranks file gpt2.tiktoken (r50k_base)>"
            ) from e
    return _load_gpt2_file(Path(tokenizer_file).expanduser())[0]


def _load_gpt2_file(path: Path) -> tuple[tiktoken.Encoding, str]:
    """Load a GPT-2 ranks file; return the encoding and the file's sha256."""
    tiktoken = _require_tiktoken()
    from tiktoken.load import load_tiktoken_bpe

    if not path.is_file():
        raise FileNotFoundError(
            f"GPT-2 tokenizer file {path} does not exist; pass tokenizer_file=<path to "
            "gpt2.tiktoken (r50k_base ranks)>, or None to let tiktoken download it"
        )
    sha = _sha256_file(path)
    if sha != _GPT2_SHA256:
        log.warning("%s is not the official r50k_base ranks file (sha256 %s)", path, sha)
    # Passing the hash matters: tiktoken keeps a copy of every file it reads in a cache keyed by
    # the *path*, and without a hash it would keep serving that copy after the file changed.
    ranks = load_tiktoken_bpe(str(path), expected_hash=sha)
    if len(ranks) != _GPT2_EOT or set(ranks.values()) != set(range(_GPT2_EOT)):
        raise ValueError(
            f"{path} holds {len(ranks)} BPE ranks, but a GPT-2 (r50k_base) ranks file holds "
            f"exactly {_GPT2_EOT}, numbered 0..{_GPT2_EOT - 1}; pass the right tokenizer_file"
        )
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": _GPT2_EOT},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )
    return enc, sha


def _gpt2_file_key(tokenizer_file: str | Path | None) -> tuple[Path | None, str | None]:
    """Resolve a GPT-2 ranks file and hash it (cache keys need the content, not just the path)."""
    _require_tiktoken()
    if tokenizer_file is None:
        return None, None
    path = Path(tokenizer_file).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"GPT-2 tokenizer file {path} does not exist; pass tokenizer_file=<path to "
            "gpt2.tiktoken (r50k_base ranks)>, or None to let tiktoken download it"
        )
    return path, _sha256_file(path)


def _gpt2_for_key(path: Path | None, sha: str | None) -> tiktoken.Encoding:
    """Load the encoding a ``_gpt2_file_key`` result names, checking the file is unchanged."""
    if path is None:
        return gpt2_encoding(None)
    enc, actual = _load_gpt2_file(path)
    if actual != sha:
        raise ValueError(
            f"tokenizer file {path} changed (sha256 {actual}, expected {sha}); restore it, or "
            "call again to tokenise with its new content"
        )
    return enc


class CharTokenizer:
    """Character-level tokenizer: token ``i`` is the ``i``-th of the sorted distinct characters.

    Args:
        chars: the vocabulary (duplicates are dropped; order does not matter).
    """

    def __init__(self, chars: Iterable[str]) -> None:
        vocab = sorted(set(chars))
        bad = [c for c in vocab if len(c) != 1]
        if bad:
            raise ValueError(f"CharTokenizer vocabulary entries must be single characters: {bad}")
        if not vocab:
            raise ValueError("CharTokenizer needs at least one character")
        self._chars = vocab
        # str sorting is by code point, so this array is sorted and searchsorted can encode.
        self._codes = np.array([ord(c) for c in vocab], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """A tokenizer whose vocabulary is every distinct character of ``text``."""
        return cls(set(text))

    @property
    def chars(self) -> list[str]:
        """The vocabulary, in token order."""
        return list(self._chars)

    @property
    def vocab_size(self) -> int:
        """Number of tokens."""
        return len(self._chars)

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an int64 array (vectorised; no per-character Python loop)."""
        # UTF-32 gives one fixed-width code point per character; surrogatepass keeps lone
        # surrogates (which a str may hold) encodable instead of raising.
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        found = ids < len(self._codes)
        found[found] = self._codes[ids[found]] == codes[found]
        if not found.all():
            unknown = sorted({chr(c) for c in codes[~found]})
            raise ValueError(
                f"{len(unknown)} character(s) not in the vocabulary, e.g. {unknown[:10]}; build "
                "the tokenizer from text that contains them"
            )
        return ids.astype(np.int64)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """The text of token ids ``ids``."""
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= len(self._codes)):
            raise ValueError(f"token ids must lie in [0, {len(self._codes)}); got {arr.min()}..")
        return self._codes[arr.reshape(-1)].tobytes().decode("utf-32-le", "surrogatepass")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self._chars == other._chars

    def __hash__(self) -> int:
        return hash(tuple(self._chars))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


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
    _codec: _Codec = field(repr=False)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` under this corpus's tokenizer."""
        return self._codec.encode(text)

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


class _Codec:
    """Encode/decode for a cached corpus; loads the GPT-2 tokenizer only when first needed."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self._meta = meta
        self._char = CharTokenizer(meta["chars"]) if meta["tokenizer"] == "char" else None
        self._enc: tiktoken.Encoding | None = None

    def _gpt2(self) -> tiktoken.Encoding:
        if self._enc is None:
            file = self._meta.get("tokenizer_file")
            sha = self._meta.get("tokenizer_sha256")
            self._enc = _gpt2_for_key(None if file is None else Path(file), sha)
        return self._enc

    def encode(self, text: str) -> list[int]:
        if self._char is not None:
            return self._char.encode(text)
        return self._gpt2().encode_ordinary(text)

    def decode(self, ids: np.ndarray) -> str:
        if self._char is not None:
            return self._char.decode(ids)
        return self._gpt2().decode(ids.tolist())


def prepare_text(
    path: str | Path,
    *,
    tokenizer: str = "char",
    tokenizer_file: str | Path | None = None,
    val_fraction: float = 0.05,
    cache_dir: str | Path | None = None,
) -> TextData:
    """Tokenise a UTF-8 text file once and return memory-mapped train/validation token arrays.

    The last ``val_fraction`` of the file's characters is the validation split; the two parts are
    tokenised separately. Files are streamed in ~1 M-character pieces cut where the cut cannot
    change any token, so memory stays bounded and the tokens equal those of tokenising each part
    whole. The result is cached in ``<cache_dir>/text/<name>-<tokenizer>-<key>/`` where the key
    hashes the source's path, size and mtime, the tokenizer (and its file's content) and
    ``val_fraction``; a later call with the same inputs only memory-maps the files.

    Args:
        path: a UTF-8 text file, optionally gzip-compressed (detected from its content).
        tokenizer: ``"char"`` (vocabulary = the file's sorted distinct characters) or ``"gpt2"``.
        tokenizer_file: for ``"gpt2"``, a local GPT-2 ranks file (see ``gpt2_encoding``);
            without it tiktoken's own copy is used (downloaded when online).
        val_fraction: fraction of characters, from the end, held out for validation; in [0, 1).
        cache_dir: where the cache folder goes; default ``$STRUCTLIN_DATA``, else
            ``~/.cache/structlin``.

    Returns:
        The tokenised corpus.

    Raises:
        FileNotFoundError: ``path`` (or ``tokenizer_file``) does not exist.
        ValueError: bad ``tokenizer`` / ``val_fraction``, the file is empty or not UTF-8, leaves no
            training text, or its character vocabulary exceeds 65,536 (``uint16`` ids).
    """
    if tokenizer not in _TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {list(_TOKENIZERS)}")
    if tokenizer_file is not None and tokenizer != "gpt2":
        raise ValueError("tokenizer_file only applies to tokenizer='gpt2'")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1); got {val_fraction}")
    src = Path(path).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"text file {src} does not exist; pass the path of a UTF-8 file")
    src = src.resolve()

    tok_file: Path | None = None
    tok_sha: str | None = None
    if tokenizer == "gpt2":
        # Only hash the file here: a cache hit must not pay for (or, offline, fail at) loading it.
        tok_file, tok_sha = _gpt2_file_key(tokenizer_file)

    st = src.stat()
    key_text = json.dumps(
        [_CACHE_VERSION, str(src), st.st_size, st.st_mtime_ns, tokenizer, tok_sha, val_fraction]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", src.name)[:48]
    folder = _cache_dir(cache_dir) / "text" / f"{stem}-{tokenizer}-{key}"
    data = _open_cached(folder)
    if data is not None:
        return data

    def write(train_f: IO[bytes], val_f: IO[bytes]) -> dict[str, Any]:
        start = time.perf_counter()
        n_chars, charset = _scan(src)
        if n_chars == 0:
            raise ValueError(f"{src} is empty; there is nothing to tokenise")
        n_val = round(n_chars * val_fraction)
        n_train = n_chars - n_val
        if n_train == 0:
            raise ValueError(f"val_fraction={val_fraction} leaves no training text in {src}")
        meta: dict[str, Any] = {"tokenizer": tokenizer, "chars": None}
        encode: Callable[[str], np.ndarray]
        if tokenizer == "char":
            char_tok = CharTokenizer(charset)
            if char_tok.vocab_size > _MAX_VOCAB:
                raise ValueError(
                    f"{src} has {char_tok.vocab_size} distinct characters, more than the "
                    f"{_MAX_VOCAB} that uint16 token ids can hold; use tokenizer='gpt2'"
                )
            meta.update(chars=char_tok.chars, vocab_size=char_tok.vocab_size)
            encode = char_tok.encode_array
        else:
            enc = _gpt2_for_key(tok_file, tok_sha)
            meta.update(
                vocab_size=enc.n_vocab,
                tokenizer_file=None if tok_file is None else str(tok_file),
                tokenizer_sha256=tok_sha,
            )

            def encode(text: str) -> np.ndarray:
                # encode_ordinary: "<|endoftext|>" in the file is plain text, not a special token.
                return np.asarray(enc.encode_ordinary(text), dtype=np.int64)

        counts = {"train": 0, "val": 0}
        outs = {"train": train_f, "val": val_f}
        for part, chunk in _split_chunks(_read_pieces(src), n_train):
            ids = encode(chunk)
            # The char vocabulary was checked above and GPT-2's fits; this guards the cast.
            if ids.size and ids.max() >= _MAX_VOCAB:
                raise ValueError(f"token id {ids.max()} does not fit uint16")
            outs[part].write(ids.astype(_TOKEN_DTYPE).tobytes())
            counts[part] += int(ids.size)
        seconds = time.perf_counter() - start
        log.info("tokenised %s (%d tokens) in %.1f s", src, sum(counts.values()), seconds)
        meta.update(
            source={"path": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns},
            val_fraction=val_fraction,
            train_chars=n_train,
            val_chars=n_val,
            train_tokens=counts["train"],
            val_tokens=counts["val"],
        )
        return meta

    log.info("tokenising %s with %s into %s", src, tokenizer, folder)
    return _build(folder, write)


# --- reading and chunking ------------------------------------------------------------------------


def _open_text(src: Path) -> IO[str]:
    with open(src, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    # newline="": keep "\r\n" and lone "\r" exactly as in the file.
    if gz:
        return gzip.open(src, "rt", encoding="utf-8", newline="")
    return open(src, encoding="utf-8", newline="")


def _read_pieces(src: Path) -> Iterator[str]:
    try:
        with _open_text(src) as f:
            while piece := f.read(_CHUNK_CHARS):
                yield piece
    except UnicodeDecodeError as e:
        raise ValueError(f"{src} is not valid UTF-8 ({e}); convert it to UTF-8 first") from e
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"could not read {src} ({e}); the gzip file may be truncated") from e


def _scan(src: Path) -> tuple[int, set[str]]:
    """Count the characters and collect the distinct ones (the split point needs the total)."""
    n, charset = 0, set()
    for piece in _read_pieces(src):
        n += len(piece)
        charset.update(piece)
    return n, charset


def _split_chunks(pieces: Iterable[str], n_train: int) -> Iterator[tuple[str, str]]:
    """Yield ``("train"|"val", chunk)``: the first ``n_train`` characters, then the rest, each part
    re-cut at token-safe points."""

    def parts() -> Iterator[tuple[str, str]]:
        left = n_train
        for piece in pieces:
            if left >= len(piece):
                left -= len(piece)
                yield "train", piece
            else:
                if left:
                    yield "train", piece[:left]
                yield "val", piece[left:]
                left = 0

    buf, buf_part = "", "train"
    for part, piece in parts():
        if part != buf_part:
            # The split is a hard boundary: each part is tokenised on its own.
            if buf:
                yield buf_part, buf
            buf, buf_part = "", part
        buf += piece
        if len(buf) >= _CHUNK_CHARS:
            cut = _last_safe_cut(buf)
            if cut:
                yield buf_part, buf[:cut]
                buf = buf[cut:]
            # else: no safe cut yet (rare: e.g. one huge token-like run); keep accumulating.
    if buf:
        yield buf_part, buf


def _last_safe_cut(text: str) -> int:
    """Index of the last token-safe cut in ``text`` (0 if none)."""
    # Prose has a space every few characters, so the tail almost always holds one.
    for start in (max(0, len(text) - 4096), 0):
        last = 0
        for m in _SAFE_CUT.finditer(text, start):
            last = m.start()
        if last:
            return last
    return 0


# --- the cache folder ----------------------------------------------------------------------------


def _empty_tokens() -> np.ndarray:
    arr = np.empty(0, dtype=_TOKEN_DTYPE)
    arr.flags.writeable = False
    return arr


def _map(path: Path, n: int) -> np.ndarray:
    # np.memmap cannot map an empty file.
    return np.memmap(path, dtype=_TOKEN_DTYPE, mode="r") if n else _empty_tokens()


def _open_cached(folder: Path) -> TextData | None:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("version") != _CACHE_VERSION:
            return None
        itemsize = np.dtype(_TOKEN_DTYPE).itemsize
        counts = {}
        for part in ("train", "val"):
            n = int(meta[f"{part}_tokens"])
            if (folder / f"{part}.bin").stat().st_size != n * itemsize:
                raise ValueError(f"{part}.bin does not hold the {n} tokens meta.json records")
            counts[part] = n
        return TextData(
            train=_map(folder / "train.bin", counts["train"]),
            val=_map(folder / "val.bin", counts["val"]),
            vocab_size=int(meta["vocab_size"]),
            tokenizer=str(meta["tokenizer"]),
            meta=meta,
            path=folder,
            _codec=_Codec(meta),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        # A damaged cache is only a lost shortcut: the caller tokenises again and replaces it.
        log.warning("ignoring unusable token cache %s: %s", folder, e)
        return None


def _build(folder: Path, write: Callable[[IO[bytes], IO[bytes]], dict[str, Any]]) -> TextData:
    """Fill a fresh folder via ``write(train_file, val_file) -> meta`` and move it into place.

    The folder is built under a temporary name and renamed, so readers and concurrent writers only
    ever see a complete cache.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        with open(tmp / "train.bin", "xb") as train_f, open(tmp / "val.bin", "xb") as val_f:
            meta = write(train_f, val_f)
        meta = {"version": _CACHE_VERSION, **meta}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
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
            shutil.rmtree(tmp, ignore_errors=True)
            data = _open_cached(folder)
            if data is None:
                raise
            return data
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    data = _open_cached(folder)
    if data is None:
        raise RuntimeError(f"the token cache {folder} just written could not be read back")
    return data


# --- batches -------------------------------------------------------------------------------------


def get_batch(
    data: np.ndarray,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` random windows of ``block_size + 1`` tokens from ``data``.

    Args:
        data: a 1-D token array, e.g. ``TextData.train`` (a memmap: only the windows are read).
        batch_size: number of windows ``B``.
        block_size: context length ``T``.
        generator: a CPU ``torch.Generator`` that draws the offsets; saving its ``get_state()``
            with a checkpoint lets a resumed run draw exactly the batches it would have drawn.
        device: where the returned tensors live; CUDA copies go through pinned memory,
            asynchronously.

    Returns:
        ``(x, y)``, int64 tensors of shape ``(B, T)`` with ``y[:, t] == x[:, t + 1]`` inside a
        window, i.e. ``y`` holds each position's next token.

    Raises:
        ValueError: ``data`` is not 1-D or is shorter than ``block_size + 1`` tokens, or
            ``batch_size`` / ``block_size`` is not positive.
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError(
            f"batch_size and block_size must be positive; got {batch_size}, {block_size}"
        )
    if data.ndim != 1:
        raise ValueError(f"data must be a 1-D token array; got shape {data.shape}")
    if len(data) < block_size + 1:
        raise ValueError(
            f"data holds {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}; use a "
            "smaller block_size or more text (a small val_fraction can leave val this short)"
        )
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    index = starts.numpy()[:, None] + np.arange(block_size + 1)
    # One fancy-indexing read of just the windows; int64 because embedding lookups want it.
    windows = torch.from_numpy(np.asarray(data[index], dtype=np.int64))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
            device, non_blocking=True
        )
    return x.to(device), y.to(device)


# --- OpenWebText ---------------------------------------------------------------------------------


def load_openwebtext(
    cache_dir: str | Path | None = None,
    *,
    tokenizer_file: str | Path | None = None,
    val_fraction: float = 0.0005,
    max_documents: int | None = None,
    dataset: str = "Skylion007/openwebtext",
    seed: int = 2357,
    batch_documents: int = 1024,
    **load_dataset_kwargs: Any,
) -> TextData:
    """OpenWebText tokenised with GPT-2, streamed from the Hugging Face Hub and cached like
    ``prepare_text`` (nanoGPT's recipe: ``<|endoftext|>`` after every document).

    Documents go to validation at random with probability ``val_fraction`` (decided by ``seed``,
    so the split is reproducible). The full corpus is ~9 B tokens (~17 GB of ``uint16``) and takes
    hours; ``max_documents`` takes only the first documents, for quick experiments.

    Args:
        cache_dir: where the cache folder goes (default as in ``prepare_text``).
        tokenizer_file: a local GPT-2 ranks file; see ``gpt2_encoding``.
        val_fraction: probability that a document is held out; in [0, 1).
        max_documents: stop after this many documents (``None``: all).
        dataset: the Hub dataset to stream; each example needs a ``"text"`` field.
        seed: seeds the train/validation assignment.
        batch_documents: documents tokenised per call (tiktoken batches them across threads).
        **load_dataset_kwargs: passed on to ``datasets.load_dataset``.

    Returns:
        The tokenised corpus.

    Raises:
        ImportError: Hugging Face ``datasets`` (or tiktoken) is not installed.
        ValueError: bad ``val_fraction`` / ``max_documents``.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "load_openwebtext needs Hugging Face datasets: pip install datasets "
            "(or tokenise a local file with prepare_text)"
        ) from e
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1); got {val_fraction}")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be positive or None; got {max_documents}")
    tok_path, tok_sha = _gpt2_file_key(tokenizer_file)

    key_text = json.dumps(
        [_CACHE_VERSION, "hf", dataset, max_documents, val_fraction, seed, tok_sha]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset.rsplit("/", 1)[-1])[:48]
    folder = _cache_dir(cache_dir) / "text" / f"{name}-gpt2-{key}"
    data = _open_cached(folder)
    if data is not None:
        return data

    def write(train_f: IO[bytes], val_f: IO[bytes]) -> dict[str, Any]:
        enc = _gpt2_for_key(tok_path, tok_sha)
        stream = datasets.load_dataset(
            dataset, split="train", streaming=True, **load_dataset_kwargs
        )
        rng = np.random.default_rng(seed)
        counts = {"train": 0, "val": 0}
        docs = {"train": 0, "val": 0}

        def flush(texts: list[str]) -> None:
            is_val = rng.random(len(texts)) < val_fraction
            for ids, held_out in zip(enc.encode_ordinary_batch(texts), is_val, strict=True):
                part = "val" if held_out else "train"
                tokens = np.asarray([*ids, _GPT2_EOT], dtype=_TOKEN_DTYPE)
                (val_f if held_out else train_f).write(tokens.tobytes())
                counts[part] += tokens.size
                docs[part] += 1

        batch: list[str] = []
        for i, example in enumerate(stream):
            if max_documents is not None and i >= max_documents:
                break
            batch.append(example["text"])
            if len(batch) >= batch_documents:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        return {
            "tokenizer": "gpt2",
            "chars": None,
            "vocab_size": enc.n_vocab,
            "tokenizer_file": None if tok_path is None else str(tok_path),
            "tokenizer_sha256": tok_sha,
            "source": {"dataset": dataset, "max_documents": max_documents, "seed": seed},
            "val_fraction": val_fraction,
            "train_documents": docs["train"],
            "val_documents": docs["val"],
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
        }

    log.info("streaming and tokenising %s into %s", dataset, folder)
    return _build(folder, write)
