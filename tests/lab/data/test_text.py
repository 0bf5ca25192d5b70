"""Tests for the text path of ``structlin_lab.data``: tokenizers, ``prepare_text`` and the token
cache, ``get_batch`` and OpenWebText.

GPT-2 paths run offline against a synthetic ranks file of the real shape (50,256 ranks); one test
tokenises the real shared Austen corpus with the real GPT-2 ranks and skips when they are absent.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import os
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structlin_lab.data import (
    CharTokenizer,
    TextData,
    get_batch,
    gpt2_encoding,
    load_openwebtext,
    openwebtext,
    prepare_text,
    text,
    token_cache,
)

tiktoken = pytest.importorskip("tiktoken", reason="GPT-2 tests need tiktoken (structlin[text])")

SAMPLE = (
    "It is a truth universally acknowledged, that a single man in possession\n"
    "of a good fortune, must be in want of a wife.\n\n"
    "However little known the feelings or views of such a man may be on his\n"
    "first entering a neighbourhood, this truth is so well fixed in the minds\n"
    "of the surrounding families, that he is considered the rightful property\n"
    "of some one or other of their daughters.  Ünïcödé — ok? 'tis 12,345.\r\n"
)


def _write_fake_ranks(path: Path) -> Path:
    """A ranks file shaped like GPT-2's: 256 single bytes, then 50,000 two-byte merges."""
    tokens = [bytes([b]) for b in range(256)]
    tokens += [bytes([a, b]) for a in range(256) for b in range(256)][: 50256 - 256]
    lines = (base64.b64encode(t) + b" " + str(rank).encode() for rank, t in enumerate(tokens))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture(scope="session", autouse=True)
def _private_tiktoken_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # tiktoken copies every ranks file it reads into a cache keyed by the file's path; each test's
    # fresh tmp path would otherwise leave another copy in the shared system temp dir.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken_cache")))
        yield


@pytest.fixture(scope="session")
def fake_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_fake_ranks(tmp_path_factory.mktemp("ranks") / "fake.tiktoken")


@pytest.fixture(scope="session")
def fake_encoding(fake_ranks: Path) -> tiktoken.Encoding:
    return gpt2_encoding(fake_ranks)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _write(path: Path, content: str, gz: bool = False) -> Path:
    data = content.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _folders(cache: Path) -> list[Path]:
    return sorted((cache / "text").iterdir()) if (cache / "text").is_dir() else []


# --- CharTokenizer -------------------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_order() -> None:
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.vocab_size == 8
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode([3, 2, 4, 4, 5]) == "hello"
    assert tok.decode(np.array([7, 5], dtype=np.uint16)) == "wo"
    assert tok.encode("") == [] and tok.decode([]) == ""
    assert tok == CharTokenizer("dlrowhe ") and repr(tok) == "CharTokenizer(vocab_size=8)"


def test_char_tokenizer_handles_astral_and_surrogate_chars() -> None:
    text_in = "a😀\udc80b"  # an emoji outside the BMP and a lone surrogate
    tok = CharTokenizer.from_text(text_in)
    assert tok.decode(tok.encode(text_in)) == text_in
    assert len(tok.encode(text_in)) == 4


def test_char_tokenizer_errors() -> None:
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"not in the vocabulary, e\.g\. \['x', 'z'\]"):
        tok.encode("abxzx")
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match=r"single characters: \['ab'\]"):
        CharTokenizer(["a", "ab"])
    with pytest.raises(ValueError, match="at least one character"):
        CharTokenizer("")


# --- prepare_text: char --------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_prepare_char_split_meta_and_files(tmp_path: Path, cache: Path, gz: bool) -> None:
    src = _write(tmp_path / ("a.txt.gz" if gz else "a.txt"), SAMPLE, gz=gz)
    data = prepare_text(src, val_fraction=0.25, cache_dir=cache)
    n_val = round(len(SAMPLE) * 0.25)
    tok = CharTokenizer.from_text(SAMPLE)
    assert data.tokenizer == "char" and data.vocab_size == tok.vocab_size
    np.testing.assert_array_equal(data.train, tok.encode(SAMPLE[:-n_val]))
    np.testing.assert_array_equal(data.val, tok.encode(SAMPLE[-n_val:]))
    assert data.decode(data.train) + data.decode(data.val) == SAMPLE  # "\r\n" kept as is
    assert data.encode("truth") == tok.encode("truth")
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    assert not data.train.flags.writeable

    (folder,) = _folders(cache)
    assert data.path == folder and folder.name.startswith(src.name + "-char-")
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    raw = np.fromfile(folder / "val.bin", dtype=np.uint16)
    np.testing.assert_array_equal(raw, data.val)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta == data.meta
    assert meta["chars"] == tok.chars and meta["vocab_size"] == tok.vocab_size
    assert meta["train_chars"] + meta["val_chars"] == len(SAMPLE) and meta["val_chars"] == n_val
    assert meta["train_tokens"] == len(SAMPLE) - n_val and meta["val_tokens"] == n_val
    assert meta["source"] == {
        "path": str(src.resolve()),
        "size": src.stat().st_size,
        "mtime_ns": src.stat().st_mtime_ns,
    }
    assert repr(data) == (
        f"TextData(tokenizer='char', vocab_size={tok.vocab_size}, "
        f"train={len(SAMPLE) - n_val}, val={n_val})"
    )


def test_second_call_hits_cache(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _write(tmp_path / "a.txt", SAMPLE)
    first = prepare_text(src, cache_dir=cache)

    def fail(*args: object) -> None:
        raise AssertionError("tokenised again instead of using the cache")

    monkeypatch.setattr(text, "_scan", fail)
    monkeypatch.setattr(text, "_split_chunks", fail)
    second = prepare_text(src, cache_dir=cache)
    assert second.path == first.path
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.val, first.val)
    assert not [p for p in (cache / "text").iterdir() if p.name.startswith(".")]


def test_cache_key_follows_inputs(tmp_path: Path, cache: Path, fake_ranks: Path) -> None:
    src = _write(tmp_path / "a.txt", SAMPLE)
    paths = {prepare_text(src, cache_dir=cache).path}
    paths.add(prepare_text(src, val_fraction=0.1, cache_dir=cache).path)
    paths.add(prepare_text(src, tokenizer="gpt2", tokenizer_file=fake_ranks, cache_dir=cache).path)
    # Same ranks, another file content (a trailing blank line): a different tokenizer hash.
    other_ranks = tmp_path / "other.tiktoken"
    other_ranks.write_bytes(fake_ranks.read_bytes() + b"\n")
    paths.add(prepare_text(src, tokenizer="gpt2", tokenizer_file=other_ranks, cache_dir=cache).path)
    st_ = src.stat()
    os.utime(src, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    paths.add(prepare_text(src, cache_dir=cache).path)
    assert len(paths) == 5 and len(_folders(cache)) == 5


def test_damaged_cache_is_rebuilt(tmp_path: Path, cache: Path) -> None:
    src = _write(tmp_path / "a.txt", SAMPLE)
    first = prepare_text(src, cache_dir=cache)
    want = np.array(first.train)
    del first
    train_bin = _folders(cache)[0] / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:10])
    again = prepare_text(src, cache_dir=cache)
    np.testing.assert_array_equal(again.train, want)
    assert len(_folders(cache)) == 1


def test_zero_val_fraction_gives_empty_val(tmp_path: Path, cache: Path) -> None:
    src = _write(tmp_path / "a.txt", SAMPLE)
    data = prepare_text(src, val_fraction=0.0, cache_dir=cache)
    assert len(data.train) == len(SAMPLE) and data.val.shape == (0,)
    assert prepare_text(src, val_fraction=0.0, cache_dir=cache).val.shape == (0,)  # from cache


def test_cache_dir_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _write(tmp_path / "a.txt", SAMPLE)
    monkeypatch.setenv("STRUCTLIN_DATA", str(tmp_path / "env"))
    assert prepare_text(src).path.parent == tmp_path / "env" / "text"
    monkeypatch.delenv("STRUCTLIN_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    want = tmp_path / "home" / ".cache" / "structlin" / "text"
    assert prepare_text(src).path.parent == want


def test_text_data_is_frozen(tmp_path: Path, cache: Path) -> None:
    data = prepare_text(_write(tmp_path / "a.txt", SAMPLE), cache_dir=cache)
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.vocab_size = 3  # type: ignore[misc]
    assert isinstance(data, TextData)


# --- prepare_text: errors ------------------------------------------------------------------------


def test_prepare_argument_errors(tmp_path: Path, cache: Path, fake_ranks: Path) -> None:
    src = _write(tmp_path / "a.txt", SAMPLE)
    with pytest.raises(ValueError, match=r"unknown tokenizer 'bpe'.*'char', 'gpt2'"):
        prepare_text(src, tokenizer="bpe", cache_dir=cache)
    with pytest.raises(ValueError, match="only applies to tokenizer='gpt2'"):
        prepare_text(src, tokenizer_file=fake_ranks, cache_dir=cache)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"val_fraction must lie in \[0, 1\)"):
            prepare_text(src, val_fraction=bad, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"nope\.txt does not exist"):
        prepare_text(tmp_path / "nope.txt", cache_dir=cache)
    with pytest.raises(
        FileNotFoundError, match=r"missing\.tiktoken does not exist.*tokenizer_file"
    ):
        prepare_text(src, tokenizer="gpt2", tokenizer_file=tmp_path / "missing.tiktoken")
    assert not cache.exists()


def test_prepare_content_errors_leave_no_cache(tmp_path: Path, cache: Path) -> None:
    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match="is empty"):
        prepare_text(empty, cache_dir=cache)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not valid UTF-8"):
        prepare_text(latin1, cache_dir=cache)
    truncated = tmp_path / "t.txt.gz"
    truncated.write_bytes(gzip.compress(SAMPLE.encode() * 50)[:200])
    with pytest.raises(ValueError, match=r"could not read .*t\.txt\.gz"):
        prepare_text(truncated, cache_dir=cache)
    with pytest.raises(ValueError, match="leaves no training text"):
        prepare_text(_write(tmp_path / "one.txt", "x"), val_fraction=0.9, cache_dir=cache)
    assert _folders(cache) == []  # temp folders were removed


def test_char_vocab_over_uint16_is_refused(tmp_path: Path, cache: Path) -> None:
    # 65,537 distinct code points, skipping the surrogates that UTF-8 cannot hold.
    codes = [c for c in range(0x20, 0x20 + 65537 + 2048) if not 0xD800 <= c <= 0xDFFF][:65537]
    src = _write(tmp_path / "wide.txt", "".join(map(chr, codes)))
    with pytest.raises(ValueError, match=r"65537 distinct characters.*tokenizer='gpt2'"):
        prepare_text(src, val_fraction=0.0, cache_dir=cache)


# --- chunking ------------------------------------------------------------------------------------


_ALPHABET = st.sampled_from([*"ab xy\n\t.,'s1é😀", "\r\n", "  ", "'ll", "<|endoftext|>"])


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(_ALPHABET, max_size=120), split=st.floats(0.0, 1.0))
def test_chunked_tokens_equal_whole_tokens(
    fake_encoding: tiktoken.Encoding, parts: list[str], split: float
) -> None:
    text_in = "".join(parts)
    n_train = round(len(text_in) * split)
    with mock.patch.object(text, "_CHUNK_CHARS", 5):
        pieces = [text_in[i : i + 5] for i in range(0, len(text_in), 5)]
        chunks = list(text._split_chunks(pieces, n_train))
    # Small chunks force many cuts; the tokens must match tokenising each part whole.
    for part, whole in (("train", text_in[:n_train]), ("val", text_in[n_train:])):
        got = [t for p, c in chunks if p == part for t in fake_encoding.encode_ordinary(c)]
        assert "".join(c for p, c in chunks if p == part) == whole
        assert got == fake_encoding.encode_ordinary(whole)


def test_safe_cut_rejects_whitespace_runs() -> None:
    assert text._last_safe_cut("ab  cd\n\nef") == 0
    assert text._last_safe_cut("ab  cd e\n f") == 6
    assert text._last_safe_cut("ab\ncd  ") == 2


# --- GPT-2 ---------------------------------------------------------------------------------------


def test_gpt2_encoding_from_file(fake_ranks: Path, fake_encoding: tiktoken.Encoding) -> None:
    assert fake_encoding.n_vocab == 50257 and fake_encoding.eot_token == 50256
    ids = fake_encoding.encode("Hello world")
    assert fake_encoding.decode(ids) == "Hello world"
    assert fake_encoding.encode("<|endoftext|>", allowed_special="all") == [50256]
    # The pre-tokenizer is GPT-2's: " world" is one piece, so no token spans "o w".
    assert b"o " not in [fake_encoding.decode_single_token_bytes(t) for t in ids]


def test_gpt2_encoding_rejects_wrong_files(tmp_path: Path, fake_ranks: Path) -> None:
    short = tmp_path / "short.tiktoken"
    short.write_bytes(b"\n".join(fake_ranks.read_bytes().splitlines()[:1000]))
    with pytest.raises(ValueError, match=r"holds 1000 BPE ranks.*exactly 50256"):
        gpt2_encoding(short)
    with pytest.raises(FileNotFoundError, match="pass tokenizer_file"):
        gpt2_encoding(tmp_path / "none.tiktoken")


def test_gpt2_encoding_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str) -> None:
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match=r"Name or service not known.*pass tokenizer_file="):
        gpt2_encoding()


def test_prepare_gpt2_with_file(tmp_path: Path, cache: Path, fake_ranks: Path) -> None:
    content = SAMPLE + "literal <|endoftext|> stays text\n"
    src = _write(tmp_path / "a.txt", content)
    data = prepare_text(src, tokenizer="gpt2", tokenizer_file=fake_ranks, cache_dir=cache)
    enc = gpt2_encoding(fake_ranks)
    n_val = round(len(content) * 0.05)
    assert data.vocab_size == 50257 and data.tokenizer == "gpt2"
    np.testing.assert_array_equal(data.train, enc.encode_ordinary(content[:-n_val]))
    np.testing.assert_array_equal(data.val, enc.encode_ordinary(content[-n_val:]))
    assert 50256 not in data.train.tolist() + data.val.tolist()
    assert data.decode(data.train) + data.decode(data.val) == content
    assert data.decode(torch.tensor(data.encode("Hello"))) == "Hello"
    assert data.meta["tokenizer_file"] == str(fake_ranks.resolve())
    assert data.meta["chars"] is None


def test_gpt2_changed_tokenizer_file_is_detected_on_decode(
    tmp_path: Path, cache: Path, fake_ranks: Path
) -> None:
    ranks = tmp_path / "ranks.tiktoken"
    ranks.write_bytes(fake_ranks.read_bytes())
    src = _write(tmp_path / "a.txt", SAMPLE)
    prepare_text(src, tokenizer="gpt2", tokenizer_file=ranks, cache_dir=cache)
    (folder,) = _folders(cache)
    data = token_cache.open_cached(folder)  # as a later session would, without re-hashing the file
    assert data is not None
    ranks.write_bytes(fake_ranks.read_bytes() + b"\n")
    with pytest.raises(ValueError, match=r"ranks\.tiktoken changed"):
        data.decode([1, 2])


def test_prepare_gpt2_builtin_loads_only_when_tokenising(
    tmp_path: Path, cache: Path, fake_encoding: tiktoken.Encoding, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def builtin(name: str) -> tiktoken.Encoding:
        calls.append(name)
        return fake_encoding

    monkeypatch.setattr(tiktoken, "get_encoding", builtin)
    src = _write(tmp_path / "a.txt", SAMPLE)
    first = prepare_text(src, tokenizer="gpt2", cache_dir=cache)
    assert calls == ["gpt2"] and first.meta["tokenizer_file"] is None

    def offline(name: str) -> None:
        raise ConnectionError("offline")

    # A cache hit needs no tokenizer, so it works offline; decoding then needs one.
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    second = prepare_text(src, tokenizer="gpt2", cache_dir=cache)
    np.testing.assert_array_equal(second.train, first.train)
    with pytest.raises(RuntimeError, match="pass tokenizer_file"):
        second.decode([1])


# --- get_batch -----------------------------------------------------------------------------------


def test_get_batch_windows_and_shift() -> None:
    data = (np.arange(1000) * 7 % 65521).astype(np.uint16)  # distinct values locate each window
    x, y = get_batch(data, 16, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 8) and x.dtype == y.dtype == torch.int64
    assert x.device.type == "cpu"
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        (start,) = np.nonzero(data == row_x[0])[0]
        np.testing.assert_array_equal(row_x, data[start : start + 8])
        np.testing.assert_array_equal(row_y, data[start + 1 : start + 9])


def test_get_batch_uses_every_offset_including_the_last() -> None:
    data = np.arange(12, dtype=np.uint16)
    x, y = get_batch(data, 400, 4, torch.Generator().manual_seed(1))
    assert sorted(set(x[:, 0].tolist())) == list(range(8))  # starts 0..len-block_size-1
    assert int(y.max()) == 11
    x, y = get_batch(data[:5], 3, 4, torch.Generator())  # exactly block_size + 1 tokens
    assert x.tolist() == [[0, 1, 2, 3]] * 3 and y.tolist() == [[1, 2, 3, 4]] * 3


def test_get_batch_resumes_from_generator_state() -> None:
    data = np.arange(5000, dtype=np.uint16)
    gen = torch.Generator().manual_seed(123)
    get_batch(data, 4, 16, gen)
    state = gen.get_state()
    want = [get_batch(data, 4, 16, gen) for _ in range(3)]
    resumed = torch.Generator()
    resumed.set_state(state)
    got = [get_batch(data, 4, 16, resumed) for _ in range(3)]
    for (wx, wy), (gx, gy) in zip(want, got, strict=True):
        assert torch.equal(wx, gx) and torch.equal(wy, gy)
    assert not torch.equal(want[0][0], want[1][0])


def test_get_batch_errors() -> None:
    gen = torch.Generator()
    with pytest.raises(ValueError, match=r"holds 8 tokens, fewer than block_size \+ 1 = 9"):
        get_batch(np.zeros(8, dtype=np.uint16), 2, 8, gen)
    with pytest.raises(ValueError, match="must be positive"):
        get_batch(np.zeros(8, dtype=np.uint16), 0, 4, gen)
    with pytest.raises(ValueError, match="1-D"):
        get_batch(np.zeros((4, 8), dtype=np.uint16), 1, 2, gen)


def test_get_batch_from_prepared_memmap(tmp_path: Path, cache: Path) -> None:
    data = prepare_text(_write(tmp_path / "a.txt", SAMPLE), cache_dir=cache)
    x, y = get_batch(data.val, 2, 5, torch.Generator().manual_seed(0))
    for row_x, row_y in zip(x, y, strict=True):
        assert data.decode(row_x) in SAMPLE and data.decode(row_y)[:-1] == data.decode(row_x)[1:]


# --- OpenWebText ---------------------------------------------------------------------------------


def test_openwebtext_without_datasets(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        load_openwebtext(cache)


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, docs: list[str]) -> list[tuple]:
    calls: list[tuple[str, str, bool]] = []

    def load_dataset(name: str, split: str, streaming: bool) -> list[dict[str, str]]:
        calls.append((name, split, streaming))
        return [{"text": d} for d in docs]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_openwebtext_with_fake_datasets(
    cache: Path, fake_ranks: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = [f"Document number {i}: {'word ' * i}end." for i in range(40)]
    calls = _fake_datasets(monkeypatch, docs)
    # Batches of 7 documents: several full ones and a partial last one.
    monkeypatch.setattr(openwebtext, "_BATCH_DOCUMENTS", 7)
    kwargs = {"tokenizer_file": fake_ranks, "val_fraction": 0.3, "max_documents": 30}
    data = load_openwebtext(cache, **kwargs)
    assert calls == [("Skylion007/openwebtext", "train", True)]
    enc = gpt2_encoding(fake_ranks)
    train_docs = data.decode(data.train).split("<|endoftext|>")
    val_docs = data.decode(data.val).split("<|endoftext|>")
    assert train_docs[-1] == "" and val_docs[-1] == ""  # every document ends with EOT
    assert sorted(train_docs[:-1] + val_docs[:-1]) == sorted(docs[:30])
    assert 0 < data.meta["val_documents"] < 30 and data.meta["train_documents"] == 30 - len(
        val_docs[:-1]
    )
    assert len(data.train) == sum(len(enc.encode_ordinary(d)) + 1 for d in train_docs[:-1])

    # Same settings: served from the cache, so the dataset is not streamed again.
    again = load_openwebtext(cache, **kwargs)
    assert len(calls) == 1
    np.testing.assert_array_equal(again.val, data.val)

    # The split does not depend on the batching: one batch of all 30 gives the same tokens.
    monkeypatch.setattr(openwebtext, "_BATCH_DOCUMENTS", 1024)
    whole = load_openwebtext(cache.parent / "other", **kwargs)
    assert len(calls) == 2
    np.testing.assert_array_equal(whole.train, data.train)
    np.testing.assert_array_equal(whole.val, data.val)


# --- real data -----------------------------------------------------------------------------------


def _shared_dir() -> Path:
    env = os.environ.get("STRUCTLIN_SHARED_DATA")
    # tests/lab/data/test_text.py -> parents[4] is the folder holding the project and shared/.
    return Path(env) if env else Path(__file__).resolve().parents[4] / "shared" / "data"


def test_real_austen_gpt2(tmp_path: Path) -> None:
    shared = _shared_dir()
    corpus, ranks = shared / "austen.txt.gz", shared / "gpt2.tiktoken"
    if not (corpus.is_file() and ranks.is_file()):
        pytest.skip(
            f"austen.txt.gz / gpt2.tiktoken not found in {shared}; set STRUCTLIN_SHARED_DATA to "
            "the shared data folder to run this test"
        )
    enc = gpt2_encoding(ranks)
    assert enc.encode("Hello world") == [15496, 995] and enc.n_vocab == 50257

    start = time.perf_counter()
    data = prepare_text(corpus, tokenizer="gpt2", tokenizer_file=ranks, cache_dir=tmp_path)
    seconds = time.perf_counter() - start
    total = len(data.train) + len(data.val)
    assert 0.95e6 < total < 1.03e6, total
    assert 0.045 < len(data.val) / total < 0.055
    assert data.vocab_size == 50257 and data.meta["train_chars"] + data.meta["val_chars"] == 4025032
    assert seconds < 15, f"tokenising Austen took {seconds:.1f} s"

    with gzip.open(corpus, "rt", encoding="utf-8", newline="") as f:
        whole = f.read()
    n_train = data.meta["train_chars"]
    # Streaming in chunks must give exactly the tokens of encoding each part whole.
    np.testing.assert_array_equal(data.val, enc.encode_ordinary(whole[n_train:]))
    np.testing.assert_array_equal(data.train, enc.encode_ordinary(whole[:n_train]))
    sample = whole[100_000:102_000]
    assert data.decode(data.encode(sample)) == sample
    assert data.decode(data.val) == whole[n_train:]
