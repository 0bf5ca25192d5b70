"""CIFAR-10 / CIFAR-100 as plain uint8 numpy arrays, decoded once and cached as ``.npz``.

``load_cifar`` accepts the official python-format archive or its extracted folder, an image-folder
archive or folder (``{train,test}/<class>/*.jpg|png``), a previously cached decode, or downloads
the official archive. Decoding is the slow part (the 60k-JPEG image-folder archive takes 15-25 s),
so every decode is cached under a key derived from the source's path, size and mtime.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..download import Remote, download
from ..download import cache_dir as _cache_dir
from .arrays import ImageArrays, load_first_npz, load_npz, save_npz

__all__ = ["CifarArrays", "load_cifar"]

log = logging.getLogger(__name__)

# Bump when the decoded content could change for the same source, so stale caches are not reused.
_CACHE_VERSION = 1
_IMAGE_SIZE = 32
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
_SPLITS = ("train", "test")
_CIFAR10_PY_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_CIFAR100_PY_FILES = ("train", "test", "meta")
# Extracted folders may be passed directly or via their parent, so layouts may sit one level down.
_MAX_PREFIX_DEPTH = 1
_SOURCE_HELP = (
    "pass source= pointing to the official cifar-10-python.tar.gz / cifar-100-python.tar.gz, "
    "its extracted folder, or an image-folder archive/folder laid out as "
    "{train,test}/<class>/*.jpg|png; or pass download=True"
)


# Module-level so tests can point the download at a local file:// archive.
_REMOTES: dict[str, Remote] = {
    "cifar10": Remote(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        filename="cifar-10-python.tar.gz",
    ),
    "cifar100": Remote(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        filename="cifar-100-python.tar.gz",
    ),
}


class CifarArrays(ImageArrays):
    """A CIFAR dataset held in memory.

    Attributes:
        train_x: ``(N_train, 32, 32, 3)`` uint8 images, HWC, RGB.
        train_y: ``(N_train,)`` int64 labels, indices into ``classes``.
        test_x: ``(N_test, 32, 32, 3)`` uint8 images.
        test_y: ``(N_test,)`` int64 labels.
        classes: class names; CIFAR-100 uses the 100 fine labels.
    """


def load_cifar(
    name: str = "cifar10",
    root: str | Path | None = None,
    *,
    source: str | Path | None = None,
    download: bool = False,
) -> CifarArrays:
    """Load CIFAR-10 or CIFAR-100 as uint8 arrays, decoding at most once per source.

    Sources are tried in order: an explicit ``source``; a decoded ``.npz`` (or the official archive)
    already in the cache dir; and, if ``download`` is true, the official archive fetched from the
    canonical URL and checked against its md5.

    Args:
        name: ``"cifar10"`` or ``"cifar100"`` (fine labels).
        root: cache dir; default ``$STRUCTLIN_DATA``, else ``~/.cache/structlin``.
        source: the official python-format archive (``cifar-10-python.tar.gz``) or its extracted
            folder (``cifar-10-batches-py/``, ``cifar-100-python/``), or an image-folder archive
            (``.tar``, ``.tar.gz``, ``.tgz``) or folder laid out as ``{train,test}/<class>/*.jpg``
            (optionally one folder down). The kind is detected from the contents. Image folders
            need Pillow and take their classes from the sorted subfolders of ``train/``.
        download: fetch the official archive into the cache dir when nothing else is available.

    Returns:
        The arrays; image-folder samples are ordered by class, then file name.

    Raises:
        FileNotFoundError: ``source`` does not exist, or no data is cached and ``download`` is off.
        ValueError: unknown ``name``, unrecognised or corrupt source, images not 32x32, train and
            test classes differ, source holds the other CIFAR, or the download's md5 is wrong.
        ConnectionError: the download failed.
    """
    if name not in _REMOTES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(_REMOTES)}")
    cache_dir = _cache_dir(root)
    if source is not None:
        return _load_source(name, Path(source).expanduser(), cache_dir)

    cached = _find_cached(name, cache_dir)
    if cached is not None:
        return cached
    remote = _REMOTES[name]
    archive = cache_dir / remote.filename
    if archive.is_file():
        # An earlier download whose decode was deleted or never cached: no need to fetch again.
        return _load_source(name, archive, cache_dir)
    if download:
        _download(remote, archive)
        return _load_source(name, archive, cache_dir)
    raise FileNotFoundError(f"no {name} data cached in {cache_dir}; {_SOURCE_HELP}")


def _load_source(name: str, src: Path, cache_dir: Path) -> CifarArrays:
    if not src.exists():
        raise FileNotFoundError(f"CIFAR source {src} does not exist; {_SOURCE_HELP}")
    cache = cache_dir / f"{name}-{_source_key(src)}.npz"
    if cache.is_file():
        arrays = load_npz(CifarArrays, cache)
        if arrays is not None:
            return arrays
    log.info("decoding %s from %s (cached afterwards in %s)", name, src, cache)
    arrays = _decode_source(name, src)
    save_npz(arrays, cache)
    return arrays


def _source_key(src: Path) -> str:
    src = src.resolve()
    if src.is_dir():
        # A folder's own mtime misses edits to files inside it, so fingerprint what we would read.
        count = size = mtime = 0
        for _, path in _walk(src, _MAX_PREFIX_DEPTH + 3):
            st = path.stat()
            count, size, mtime = count + 1, size + st.st_size, max(mtime, st.st_mtime_ns)
    else:
        st = src.stat()
        count, size, mtime = 1, st.st_size, st.st_mtime_ns
    text = f"{_CACHE_VERSION}|{src}|{count}|{size}|{mtime}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _find_cached(name: str, cache_dir: Path) -> CifarArrays | None:
    if not cache_dir.is_dir():
        return None
    preferred: list[Path] = []
    archive = cache_dir / _REMOTES[name].filename
    if archive.is_file():
        # The official archive's decode is the canonical one; prefer it over other sources' decodes.
        preferred.append(cache_dir / f"{name}-{_source_key(archive)}.npz")
    # "cifar10-*" cannot match "cifar100-*".
    return load_first_npz(CifarArrays, preferred, cache_dir, f"{name}-*.npz")


def _download(remote: Remote, dest: Path) -> None:
    download(
        remote.url,
        dest,
        remote.md5,
        fetch_hint=f"fetch it by other means and pass source=<path to {remote.filename}>",
    )


# --- reading sources -----------------------------------------------------------------------------


@dataclass
class _Files:
    """A source's relevant files: relative POSIX paths and a way to read each one's bytes."""

    names: list[str]
    read: Callable[[str], bytes]


def _decode_source(name: str, src: Path) -> CifarArrays:
    files = _dir_files(src) if src.is_dir() else _tar_files(src)
    kind, prefix = _detect(files.names, src)
    if kind == "image_folder":
        return _decode_image_folder(files, prefix, src)
    if kind != name:
        raise ValueError(
            f"{src} holds {_pretty(kind)} in python format, but {_pretty(name)} was requested; "
            f"call load_cifar({kind!r}, source=...)"
        )
    if kind == "cifar10":
        return _decode_cifar10_py(files, prefix, src)
    return _decode_cifar100_py(files, prefix, src)


def _pretty(name: str) -> str:
    return "CIFAR-10" if name == "cifar10" else "CIFAR-100"


def _is_candidate(parts: tuple[str, ...]) -> bool:
    """Whether a relative path could belong to any supported layout (everything else is skipped)."""
    if not parts or parts[-1].startswith("."):
        return False
    depth = len(parts) - 1
    if depth <= _MAX_PREFIX_DEPTH and parts[-1] in (*_CIFAR10_PY_FILES, *_CIFAR100_PY_FILES):
        return True
    return (
        3 <= len(parts) <= 3 + _MAX_PREFIX_DEPTH
        and parts[-3] in _SPLITS
        and PurePosixPath(parts[-1]).suffix.lower() in _IMAGE_SUFFIXES
    )


def _walk(root: Path, max_parts: int) -> Iterator[tuple[str, Path]]:
    """Yield ``(relative posix name, path)`` of files at most ``max_parts`` components deep.

    Bounded so that pointing ``source`` at a large unrelated folder fails fast instead of crawling.
    """
    stack: list[tuple[Path, tuple[str, ...]]] = [(root, ())]
    while stack:
        folder, rel = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                parts = (*rel, entry.name)
                if entry.is_dir():
                    if len(parts) < max_parts:
                        stack.append((Path(entry.path), parts))
                elif entry.is_file() and _is_candidate(parts):
                    yield "/".join(parts), Path(entry.path)


def _dir_files(src: Path) -> _Files:
    paths = dict(_walk(src, _MAX_PREFIX_DEPTH + 3))
    return _Files(names=list(paths), read=lambda n: paths[n].read_bytes())


def _tar_files(src: Path) -> _Files:
    # One streaming pass keeps only the members we may need, in memory: a gzipped tar has no index,
    # so random access would decompress from the start again for every member.
    data: dict[str, bytes] = {}
    with open(src, "rb") as fh:
        try:
            with tarfile.open(fileobj=fh, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    parts = tuple(p for p in PurePosixPath(member.name).parts if p not in ("", "."))
                    if not _is_candidate(parts):
                        continue
                    f = tar.extractfile(member)
                    if f is not None:
                        data["/".join(parts)] = f.read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise ValueError(
                f"could not read {src} as a tar archive ({e}); it may be truncated or corrupt "
                f"(delete and re-download it) or not an archive at all. Expected: {_SOURCE_HELP}"
            ) from e
    return _Files(names=list(data), read=data.__getitem__)


def _detect(names: list[str], src: Path) -> tuple[str, tuple[str, ...]]:
    """Return the layout kind (``cifar10``, ``cifar100``, ``image_folder``) and its prefix."""
    by_dir: dict[tuple[str, ...], set[str]] = {}
    image_prefixes: set[tuple[str, ...]] = set()
    for n in names:
        parts = tuple(n.split("/"))
        by_dir.setdefault(parts[:-1], set()).add(parts[-1])
        if len(parts) >= 3 and parts[-3] in _SPLITS:
            image_prefixes.add(parts[:-3])

    found: list[tuple[str, tuple[str, ...]]] = []
    for prefix, files in by_dir.items():
        if set(_CIFAR10_PY_FILES) <= files:
            found.append(("cifar10", prefix))
        elif set(_CIFAR100_PY_FILES) <= files:
            found.append(("cifar100", prefix))
        elif "data_batch_1" in files or "batches.meta" in files:
            missing = sorted(set(_CIFAR10_PY_FILES) - files)
            where = "/".join((src.name, *prefix))
            raise ValueError(
                f"{where} looks like an incomplete CIFAR-10 python folder: missing {missing}; "
                "re-extract the official archive or pass the .tar.gz itself"
            )
    found += [("image_folder", p) for p in sorted(image_prefixes)]

    if not found:
        raise ValueError(f"{src} is not a recognised CIFAR source; {_SOURCE_HELP}")
    if len(found) > 1:
        where = ["/".join((src.name, *p)) for _, p in found]
        raise ValueError(
            f"{src} holds several CIFAR datasets ({', '.join(where)}); pass one of them as source="
        )
    return found[0]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for the official batches: they hold only dicts, lists, bytes and numpy arrays.

    Anything else is refused, because a pickle can otherwise run arbitrary code.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            # Python 3 protocol-2 pickles encode bytes through this (only in our test fixtures).
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(files: _Files, name: str, src: Path) -> dict[bytes, Any]:
    try:
        # The batches were pickled by Python 2; "bytes" keeps its str keys and data undecoded.
        obj = _ArrayUnpickler(io.BytesIO(files.read(name)), encoding="bytes").load()
    except Exception as e:  # unpickling corrupt bytes can raise almost anything
        raise ValueError(f"could not unpickle {name} from {src} ({e}); it is corrupt") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{name} in {src} is not a CIFAR batch dict")
    return obj


def _batch(files: _Files, name: str, src: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(files, name, src)
    try:
        data, labels = d[b"data"], d[label_key]
    except KeyError as e:
        raise ValueError(f"{name} in {src} lacks key {e}; it is not an official CIFAR batch") from e
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    n = data.shape[0] if data.ndim == 2 else -1
    if data.dtype != np.uint8 or data.shape[1:] != (3 * _IMAGE_SIZE**2,) or labels.shape != (n,):
        raise ValueError(
            f"{name} in {src} has data {data.dtype} {data.shape} and {labels.shape} labels; "
            f"expected uint8 (N, {3 * _IMAGE_SIZE**2}) and N labels"
        )
    # Rows are channel-major (1024 R, 1024 G, 1024 B); convert to HWC like image files.
    images = data.reshape(n, 3, _IMAGE_SIZE, _IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _class_names(files: _Files, name: str, src: Path, key: bytes) -> list[str]:
    meta = _unpickle(files, name, src)
    if key not in meta:
        raise ValueError(f"{name} in {src} lacks key {key!r}; it is not a CIFAR meta file")
    return [c.decode() if isinstance(c, bytes) else str(c) for c in meta[key]]


def _checked(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: list[str],
    src: Path,
) -> CifarArrays:
    for y in (train[1], test[1]):
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise ValueError(f"labels in {src} fall outside the {len(classes)} classes of its meta")
    return CifarArrays(train[0], train[1], test[0], test[1], classes)


def _decode_cifar10_py(files: _Files, prefix: tuple[str, ...], src: Path) -> CifarArrays:
    def path(n: str) -> str:
        return "/".join((*prefix, n))

    parts = [_batch(files, path(f"data_batch_{i}"), src, b"labels") for i in range(1, 6)]
    train = np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
    test = _batch(files, path("test_batch"), src, b"labels")
    classes = _class_names(files, path("batches.meta"), src, b"label_names")
    return _checked(train, test, classes, src)


def _decode_cifar100_py(files: _Files, prefix: tuple[str, ...], src: Path) -> CifarArrays:
    def path(n: str) -> str:
        return "/".join((*prefix, n))

    train = _batch(files, path("train"), src, b"fine_labels")
    test = _batch(files, path("test"), src, b"fine_labels")
    classes = _class_names(files, path("meta"), src, b"fine_label_names")
    return _checked(train, test, classes, src)


def _decode_image_folder(files: _Files, prefix: tuple[str, ...], src: Path) -> CifarArrays:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(
            "image-folder CIFAR sources need Pillow: pip install 'structlin[data]'"
        ) from e

    split_items: dict[str, list[tuple[str, str]]] = {s: [] for s in _SPLITS}
    for n in files.names:
        parts = tuple(n.split("/"))
        if len(parts) >= 3 and parts[:-3] == prefix and parts[-3] in _SPLITS:
            split_items[parts[-3]].append((parts[-2], n))

    where = "/".join((src.name, *prefix))
    for split, items in split_items.items():
        if not items:
            raise ValueError(f"{where}/{split}/ has no .jpg/.png images; {_SOURCE_HELP}")
    classes = sorted({c for c, _ in split_items["train"]})
    test_classes = {c for c, _ in split_items["test"]}
    if set(classes) != test_classes:
        raise ValueError(
            f"train and test class folders differ in {where}: only in train "
            f"{sorted(set(classes) - test_classes)}, only in test "
            f"{sorted(test_classes - set(classes))}; both splits need the same class subfolders"
        )
    index = {c: i for i, c in enumerate(classes)}

    def decode(items: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        # Sequential on purpose: a Pool's spawned workers must re-import torch (via structlin),
        # which cost as much as it saved on 2 cores, and fork is unsafe once torch has threads.
        items = sorted(items)
        images = np.empty((len(items), _IMAGE_SIZE, _IMAGE_SIZE, 3), dtype=np.uint8)
        for i, (_, n) in enumerate(items):
            try:
                with Image.open(io.BytesIO(files.read(n))) as im:
                    if im.size != (_IMAGE_SIZE, _IMAGE_SIZE):
                        raise ValueError(
                            f"{n} in {src} is {im.size[0]}x{im.size[1]}; CIFAR images must be "
                            f"{_IMAGE_SIZE}x{_IMAGE_SIZE}, so resize the folder or pick another"
                        )
                    images[i] = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
            except (OSError, SyntaxError) as e:  # Pillow's errors for unreadable image data
                raise ValueError(f"could not decode {n} in {src}: {e}") from e
        labels = np.array([index[c] for c, _ in items], dtype=np.int64)
        return images, labels

    train_x, train_y = decode(split_items["train"])
    test_x, test_y = decode(split_items["test"])
    return CifarArrays(train_x, train_y, test_x, test_y, classes)
