"""Tokenizers for language modelling: characters, and GPT-2's byte-level BPE through tiktoken."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import tiktoken

__all__ = [
    "GPT2_EOT",
    "GPT2_VOCAB_SIZE",
    "CharTokenizer",
    "gpt2_encoding",
    "gpt2_file_key",
    "load_gpt2",
]

log = logging.getLogger(__name__)

# GPT-2 / r50k_base, as in tiktoken_ext.openai_public (which writes the same regex with possessive
# quantifiers, an equivalent form).
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = 50256
GPT2_VOCAB_SIZE = 50257
_GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


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


# --- GPT-2 ---------------------------------------------------------------------------------------


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


def _missing_ranks_file(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"GPT-2 tokenizer file {path} does not exist; pass tokenizer_file=<path to "
        "gpt2.tiktoken (r50k_base ranks)>, or None to let tiktoken download it"
    )


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
        raise _missing_ranks_file(path)
    sha = _sha256_file(path)
    if sha != _GPT2_SHA256:
        log.warning("%s is not the official r50k_base ranks file (sha256 %s)", path, sha)
    # Passing the hash matters: tiktoken keeps a copy of every file it reads in a cache keyed by
    # the *path*, and without a hash it would keep serving that copy after the file changed.
    ranks = load_tiktoken_bpe(str(path), expected_hash=sha)
    if len(ranks) != GPT2_EOT or set(ranks.values()) != set(range(GPT2_EOT)):
        raise ValueError(
            f"{path} holds {len(ranks)} BPE ranks, but a GPT-2 (r50k_base) ranks file holds "
            f"exactly {GPT2_EOT}, numbered 0..{GPT2_EOT - 1}; pass the right tokenizer_file"
        )
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )
    return enc, sha


def gpt2_file_key(tokenizer_file: str | Path | None) -> tuple[Path | None, str | None]:
    """Resolve a GPT-2 ranks file and hash it, without loading it (cache keys need the content,
    and a cache hit must not pay for, or offline fail at, loading the tokenizer).

    Returns ``(None, None)`` for tiktoken's built-in copy. Raises ImportError without tiktoken.
    """
    _require_tiktoken()
    if tokenizer_file is None:
        return None, None
    path = Path(tokenizer_file).expanduser().resolve()
    if not path.is_file():
        raise _missing_ranks_file(path)
    return path, _sha256_file(path)


def load_gpt2(path: Path | None, sha: str | None) -> tiktoken.Encoding:
    """Load the encoding a :func:`gpt2_file_key` result names, checking the file is unchanged."""
    if path is None:
        return gpt2_encoding(None)
    enc, actual = _load_gpt2_file(path)
    if actual != sha:
        raise ValueError(
            f"tokenizer file {path} changed (sha256 {actual}, expected {sha}); restore it, or "
            "call again to tokenise with its new content"
        )
    return enc
