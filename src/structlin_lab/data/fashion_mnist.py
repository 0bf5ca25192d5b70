"""Fashion-MNIST as plain uint8 numpy arrays, decoded once from IDX files and cached as ``.npz``.

``load_fashion_mnist`` reads a folder holding the four official IDX files, a previously cached
decode, or downloads them: from the official mirror (md5-checked), and failing that from the Debian
package ``dataset-fashion-mnist`` through ``apt-get download`` and ``dpkg-deb -x``.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import subprocess
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..download import Remote, download
from ..download import cache_dir as _cache_dir
from .arrays import ImageArrays, load_first_npz, load_npz, save_npz

__all__ = ["FashionMnistArrays", "load_fashion_mnist"]

log = logging.getLogger(__name__)

# Bump when the decoded content could change for the same source, so stale caches are not reused.
_CACHE_VERSION = 1
_SIDE = 28
_IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions
_LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension
_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_DEB_PACKAGE = "dataset-fashion-mnist"
_DEB_DATA_DIR = "usr/share/datasets/fashion-mnist"
_CANONICAL_CACHE = "fashion-mnist.npz"
_DOWNLOAD_DIR = "fashion-mnist"  # under the cache dir, for the downloaded .gz files
_SOURCE_HELP = (
    "pass source= pointing to a folder with the four official IDX files (train-images-idx3-ubyte"
    ", train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally "
    ".gz), or pass download=True"
)


@dataclass(frozen=True)
class _File:
    name: str  # uncompressed IDX file name
    field: str  # the FashionMnistArrays attribute it fills
    md5_gz: str  # of the official .gz, as published
    md5_raw: str  # of the decompressed IDX content; the Debian package re-gzips the files


_FILES = (
    _File(
        "train-images-idx3-ubyte",
        "train_x",
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ),
    _File(
        "train-labels-idx1-ubyte",
        "train_y",
        "25c81989df183df01b3e8a0aad5dffbe",
        "9018921c3c673c538a1fc5bad174d6f9",
    ),
    _File(
        "t10k-images-idx3-ubyte",
        "test_x",
        "bef4ecab320f06d8554ea6380940ec79",
        "8181f5470baa50b63fa0f6fddb340f0a",
    ),
    _File(
        "t10k-labels-idx1-ubyte",
        "test_y",
        "bb300cfdad3c16e7a12a480ee83cd310",
        "15d484375f8d13e6eb1aabb0c3f46965",
    ),
)


# Module-level so tests can point the download at local file:// copies.
_REMOTES: dict[str, Remote] = {
    f.name: Remote(url=f"{_BASE_URL}{f.name}.gz", md5=f.md5_gz, filename=f"{f.name}.gz")
    for f in _FILES
}


class FashionMnistArrays(ImageArrays):
    """Fashion-MNIST held in memory.

    Attributes:
        train_x: ``(60000, 28, 28)`` uint8 greyscale images (0 = background).
        train_y: ``(60000,)`` int64 labels, indices into ``classes``.
        test_x: ``(10000, 28, 28)`` uint8 images.
        test_y: ``(10000,)`` int64 labels.
        classes: the 10 class names, ``"T-shirt/top"`` ... ``"Ankle boot"``.
    """


def load_fashion_mnist(
    root: str | Path | None = None,
    *,
    source: str | Path | None = None,
    download: bool = False,
) -> FashionMnistArrays:
    """Load Fashion-MNIST as uint8 arrays, decoding at most once per source.

    Sources are tried in order: an explicit ``source`` folder; a decoded ``.npz`` (or earlier
    downloaded files) in the cache dir; and, if ``download`` is true, the official files fetched
    from the Fashion-MNIST mirror and checked against their md5, or, when that fails, the Debian
    package ``dataset-fashion-mnist`` fetched with ``apt-get download`` (needs a Debian/Ubuntu
    system whose package lists are current: ``apt-get update``) and checked the same way.

    Args:
        root: cache dir; default ``$STRUCTLIN_DATA``, else ``~/.cache/structlin``.
        source: a folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``,
            as published) or not. Any IDX files of the right shapes are accepted, unchecked.
        download: fetch the data when nothing else is available.

    Returns:
        The arrays, in the files' order.

    Raises:
        FileNotFoundError: ``source`` or one of its files does not exist, or nothing is cached and
            ``download`` is off.
        ValueError: a file is corrupt (bad gzip, IDX magic number, dimensions or length, labels
            outside 0..9), or a download's md5 is wrong and the Debian route failed too.
        ConnectionError: the download and the Debian route both failed.
    """
    cache_dir = _cache_dir(root)
    if source is not None:
        return _load_source(Path(source).expanduser(), cache_dir)
    cached = _find_cached(cache_dir)
    if cached is not None:
        return cached
    downloads = cache_dir / _DOWNLOAD_DIR
    # Files of an earlier download whose decode was deleted or never cached need no new fetch.
    if not all((downloads / r.filename).is_file() for r in _REMOTES.values()):
        if not download:
            raise FileNotFoundError(f"no Fashion-MNIST data cached in {cache_dir}; {_SOURCE_HELP}")
        try:
            _download_missing(downloads)
        except (ConnectionError, ValueError) as e:
            arrays = _from_debian_after(e)
            save_npz(arrays, cache_dir / _CANONICAL_CACHE)
            return arrays
    return _load_source(downloads, cache_dir, cache_name=_CANONICAL_CACHE)


# --- sources and cache ---------------------------------------------------------------------------


def _source_files(folder: Path) -> dict[str, Path]:
    """Map each IDX name to the file that holds it in ``folder`` (``.gz`` preferred)."""
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise FileNotFoundError(f"Fashion-MNIST source {folder} {what}; {_SOURCE_HELP}")
    found: dict[str, Path] = {}
    for f in _FILES:
        for candidate in (folder / f"{f.name}.gz", folder / f.name):
            if candidate.is_file():
                found[f.name] = candidate
                break
    missing = [f.name for f in _FILES if f.name not in found]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST source {folder} lacks {missing} (nor their .gz); {_SOURCE_HELP}"
        )
    return found


def _source_key(paths: Sequence[Path]) -> str:
    # The files' own size and mtime: a folder's mtime misses files rewritten in place.
    parts = [str(_CACHE_VERSION)]
    for p in paths:
        st = p.stat()
        parts += [str(p.resolve()), str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _load_source(
    folder: Path, cache_dir: Path, cache_name: str | None = None
) -> FashionMnistArrays:
    files = _source_files(folder)
    name = cache_name or f"fashion-mnist-{_source_key(list(files.values()))}.npz"
    cache = cache_dir / name
    if cache.is_file() and cache_name is None:
        # Canonical caches are only consulted by _find_cached: they do not name their source.
        arrays = load_npz(FashionMnistArrays, cache)
        if arrays is not None:
            return arrays
    log.info("decoding Fashion-MNIST from %s (cached afterwards in %s)", folder, cache)
    arrays = _decode({f.name: _read_idx_bytes(files[f.name]) for f in _FILES}, str(folder))
    save_npz(arrays, cache)
    return arrays


def _find_cached(cache_dir: Path) -> FashionMnistArrays | None:
    if not cache_dir.is_dir():
        return None
    # The canonical (downloaded, checksummed) decode first, then other sources' newest first.
    preferred = [cache_dir / _CANONICAL_CACHE]
    return load_first_npz(FashionMnistArrays, preferred, cache_dir, "fashion-mnist-*.npz")


# --- IDX decoding --------------------------------------------------------------------------------


def _read_idx_bytes(path: Path) -> bytes:
    blob = path.read_bytes()
    if blob[:2] != b"\x1f\x8b":
        return blob
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(
            f"could not decompress {path} ({e}); it is truncated or corrupt: delete it and fetch "
            "it again"
        ) from e


def _parse_idx(blob: bytes, what: str, magic: int, shape_tail: tuple[int, ...]) -> np.ndarray:
    """Decode one IDX file: a big-endian magic number, one uint32 per dimension, then the bytes."""
    ndim = 1 + len(shape_tail)
    header = 4 + 4 * ndim
    found = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else None
    if found != magic:
        kind = "images" if magic == _IMAGES_MAGIC else "labels"
        raise ValueError(
            f"{what} has magic number {found}, expected {magic} (IDX {kind} of unsigned bytes); "
            "the file is corrupt, swapped with another, or not an IDX file"
        )
    if len(blob) < header:
        raise ValueError(f"{what} is truncated inside its IDX header")
    dims = tuple(int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != shape_tail:
        expected_dims = ", ".join(["N", *map(str, shape_tail)])
        raise ValueError(f"{what} has dimensions {dims}, expected ({expected_dims})")
    expected = int(np.prod(dims))
    if len(blob) - header != expected:
        raise ValueError(
            f"{what} holds {len(blob) - header} data bytes but its header {dims} needs "
            f"{expected}; the file is truncated or corrupt"
        )
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(dims)


def _decode(blobs: dict[str, bytes], where: str) -> FashionMnistArrays:
    arrays: dict[str, np.ndarray] = {}
    for f in _FILES:
        what = f"{f.name} in {where}"
        if f.field.endswith("_x"):
            arrays[f.field] = _parse_idx(blobs[f.name], what, _IMAGES_MAGIC, (_SIDE, _SIDE)).copy()
        else:
            y = _parse_idx(blobs[f.name], what, _LABELS_MAGIC, ()).astype(np.int64)
            if y.size and y.max() >= len(_CLASSES):
                raise ValueError(f"{what} has label {y.max()}; Fashion-MNIST labels are 0..9")
            arrays[f.field] = y
    for split in ("train", "test"):
        nx, ny = len(arrays[f"{split}_x"]), len(arrays[f"{split}_y"])
        if nx != ny:
            raise ValueError(f"{where} holds {nx} {split} images but {ny} {split} labels")
    return FashionMnistArrays(**arrays, classes=list(_CLASSES))


# --- fetching ------------------------------------------------------------------------------------


def _download(remote: Remote, dest: Path) -> None:
    download(
        remote.url,
        dest,
        remote.md5,
        fetch_hint="fetch the four files by other means and pass source=<their folder>",
    )


def _download_missing(downloads: Path) -> None:
    for remote in _REMOTES.values():
        dest = downloads / remote.filename
        if not dest.is_file():
            _download(remote, dest)


def _from_debian_after(error: ConnectionError | ValueError) -> FashionMnistArrays:
    """The Debian package's copy, after the official download failed with ``error``."""
    log.warning("official download failed (%s); trying the Debian package %s", error, _DEB_PACKAGE)
    try:
        return _from_debian()
    except (RuntimeError, OSError, ValueError) as deb_error:
        kind = ConnectionError if isinstance(error, ConnectionError) else ValueError
        raise kind(
            f"{error}; the fallback through the Debian package {_DEB_PACKAGE} failed too: "
            f"{deb_error}"
        ) from error


def _run(cmd: list[str], cwd: Path) -> None:
    """Run a packaging tool; raise RuntimeError with its output when it fails."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=900, check=False
        )
    except FileNotFoundError as e:
        raise RuntimeError(
            f"{cmd[0]} not found: the Debian route needs a Debian/Ubuntu system"
        ) from e
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{' '.join(cmd)} timed out after {e.timeout} s") from e
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()[-1000:]
        hint = ""
        if "Unable to locate package" in output or "has no installation candidate" in output:
            hint = " (run `apt-get update` once so apt knows the package)"
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed with exit code {proc.returncode}{hint}: {output}"
        )


def _from_debian() -> FashionMnistArrays:
    """Fetch and decode the Debian package's copy, checking the decompressed files' md5s."""
    with tempfile.TemporaryDirectory(prefix="structlin-fashion-mnist-") as tmp_name:
        tmp = Path(tmp_name)
        log.info("fetching the Debian package %s into %s", _DEB_PACKAGE, tmp)
        _run(["apt-get", "download", _DEB_PACKAGE], cwd=tmp)
        debs = sorted(tmp.glob(f"{_DEB_PACKAGE}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {_DEB_PACKAGE} left no .deb in {tmp}")
        extracted = tmp / "extracted"
        _run(["dpkg-deb", "-x", str(debs[-1]), str(extracted)], cwd=tmp)
        folder = extracted / _DEB_DATA_DIR
        if not folder.is_dir():
            # A future package version might move the files; look for them anywhere inside.
            hits = sorted(extracted.rglob(f"{_FILES[0].name}*"))
            if not hits:
                raise RuntimeError(f"{debs[-1].name} holds no {_FILES[0].name}[.gz]")
            folder = hits[0].parent
        files = _source_files(folder)
        blobs = {}
        for f in _FILES:
            blob = _read_idx_bytes(files[f.name])
            # The package re-compresses the files (its .gz md5s differ from the published ones),
            # so check the content instead.
            actual = hashlib.md5(blob, usedforsecurity=False).hexdigest()
            if actual != f.md5_raw:
                raise ValueError(
                    f"{f.name} from {debs[-1].name} has content md5 {actual}, expected "
                    f"{f.md5_raw}: it is not the official Fashion-MNIST"
                )
            blobs[f.name] = blob
        return _decode(blobs, debs[-1].name)
