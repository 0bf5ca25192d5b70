"""Token streams for language modelling from a text file, tokenised once and cached.

``prepare_text`` reads a UTF-8 text file (plain or gzipped), holds out its last ``val_fraction`` of
characters for validation, tokenises both parts with a character-level or the GPT-2 BPE tokenizer
(:mod:`~structlin_lab.data.tokenizers`) and stores the tokens in the token cache
(:mod:`~structlin_lab.data.token_cache`); later calls with the same source and settings only
memory-map them.
"""

from __future__ import annotations

import functools
import gzip
import logging
import re
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .token_cache import MAX_VOCAB, Codec, TextData, TokenWriter, build, cache_folder, open_cached
from .tokenizers import gpt2_file_key

__all__ = ["prepare_text"]

log = logging.getLogger(__name__)

# Characters read and tokenised per step: bounds memory on large files while keeping per-call
# overhead negligible (tiktoken encodes ~1 M characters in ~0.15 s).
_CHUNK_CHARS = 1 << 20
_TOKENIZERS = ("char", "gpt2")

# A single space or newline between two non-space characters. Cutting the text just before it
# cannot change GPT-2 tokens: no pre-tokenizer piece spans it (pieces of non-space characters stop
# at whitespace, and a lone whitespace character is its own piece or the start of " word"), and
# the pattern has no look-behind, so the right part is split exactly as inside the whole text.
# Python's \S is never wider than the Rust regex's, so the check errs on the safe side.
_SAFE_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")


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
    src = _checked_source(path, tokenizer, tokenizer_file, val_fraction)
    # Only hash the tokenizer file here: a cache hit must not load it (nor need tiktoken's copy).
    tok_file, tok_sha = gpt2_file_key(tokenizer_file) if tokenizer == "gpt2" else (None, None)
    st = src.stat()
    source = {"path": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    key = [*source.values(), tokenizer, tok_sha, val_fraction]
    folder = cache_folder(cache_dir, src.name, tokenizer, key)
    data = open_cached(folder)
    if data is not None:
        return data
    log.info("tokenising %s with %s into %s", src, tokenizer, folder)
    write = functools.partial(
        _tokenise_file,
        src=src,
        tokenizer=tokenizer,
        gpt2_file=(tok_file, tok_sha),
        val_fraction=val_fraction,
        source=source,
    )
    return build(folder, write)


def _checked_source(
    path: str | Path, tokenizer: str, tokenizer_file: str | Path | None, val_fraction: float
) -> Path:
    """Validate ``prepare_text``'s arguments; return the resolved source file."""
    if tokenizer not in _TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {list(_TOKENIZERS)}")
    if tokenizer_file is not None and tokenizer != "gpt2":
        raise ValueError("tokenizer_file only applies to tokenizer='gpt2'")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1); got {val_fraction}")
    src = Path(path).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"text file {src} does not exist; pass the path of a UTF-8 file")
    return src.resolve()


def _tokenise_file(
    writer: TokenWriter,
    *,
    src: Path,
    tokenizer: str,
    gpt2_file: tuple[Path | None, str | None],
    val_fraction: float,
    source: dict[str, Any],
) -> dict[str, Any]:
    """Write the tokens of ``src``'s two parts through ``writer``; return the cache's metadata
    (``source`` describes the file as the cache key saw it)."""
    start = time.perf_counter()
    n_chars, charset = _scan(src)
    if n_chars == 0:
        raise ValueError(f"{src} is empty; there is nothing to tokenise")
    n_val = round(n_chars * val_fraction)
    n_train = n_chars - n_val
    if n_train == 0:
        raise ValueError(f"val_fraction={val_fraction} leaves no training text in {src}")
    codec = Codec.gpt2(*gpt2_file) if tokenizer == "gpt2" else Codec.char(charset)
    if codec.vocab_size > MAX_VOCAB:
        raise ValueError(
            f"{src} has {codec.vocab_size} distinct characters, more than the {MAX_VOCAB} that "
            "uint16 token ids can hold; use tokenizer='gpt2'"
        )
    for part, chunk in _split_chunks(_read_pieces(src), n_train):
        writer.write(part, codec.encode_array(chunk))
    seconds = time.perf_counter() - start
    log.info("tokenised %s (%d tokens) in %.1f s", src, sum(writer.tokens.values()), seconds)
    return {
        **codec.meta,
        "source": source,
        "val_fraction": val_fraction,
        "train_chars": n_train,
        "val_chars": n_val,
    }


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


def _split_at(pieces: Iterable[str], n_train: int) -> Iterator[tuple[str, str]]:
    """``("train"|"val", piece)``: the first ``n_train`` characters, then the rest."""
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


def _split_chunks(pieces: Iterable[str], n_train: int) -> Iterator[tuple[str, str]]:
    """Yield ``("train"|"val", chunk)``: the first ``n_train`` characters, then the rest, each part
    re-cut at token-safe points into chunks of about ``_CHUNK_CHARS`` characters."""
    buf, buf_part = "", "train"
    for part, piece in _split_at(pieces, n_train):
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
