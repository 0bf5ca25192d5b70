"""Tests for ``structlin_lab.data.cifar`` on small fake datasets in every supported format.

One test decodes the real shared CIFAR-10 JPEG archive and skips when it is absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from structlin_lab.data import CifarArrays, cifar, load_cifar

Image = pytest.importorskip("PIL.Image", reason="image-folder tests need Pillow (structlin[data])")

CLASSES10 = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
PER_BATCH = 4  # images per official-format batch


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _dump(obj: object, path: Path, legacy: bool) -> None:
    blob = pickle.dumps(obj, protocol=2)
    if legacy:
        # The official batches predate numpy 2 and name numpy.core; make sure that still loads.
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(blob)


def _batch(x: np.ndarray, labels: np.ndarray, label_key: bytes) -> dict[bytes, object]:
    # Official layout: one row per image, 1024 R then 1024 G then 1024 B values (CHW).
    return {
        b"batch_label": b"fake batch",
        label_key: [int(v) for v in labels],
        b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(x))],
    }


def _write_cifar10_py(parent: Path) -> tuple[Path, CifarArrays]:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, test_x = _images(5 * PER_BATCH, 0), _images(PER_BATCH, 1)
    train_y = np.arange(5 * PER_BATCH, dtype=np.int64) % 10
    test_y = np.arange(PER_BATCH, dtype=np.int64)[::-1].copy()
    for i in range(5):
        rows = slice(i * PER_BATCH, (i + 1) * PER_BATCH)
        batch = _batch(train_x[rows], train_y[rows], b"labels")
        _dump(batch, folder / f"data_batch_{i + 1}", legacy=True)
    _dump(_batch(test_x, test_y, b"labels"), folder / "test_batch", legacy=True)
    meta = {
        b"label_names": [c.encode() for c in CLASSES10],
        b"num_cases_per_batch": PER_BATCH,
        b"num_vis": 3072,
    }
    _dump(meta, folder / "batches.meta", legacy=True)
    (folder / "readme.html").write_text("<html></html>")
    return folder, CifarArrays(train_x, train_y, test_x, test_y, CLASSES10)


def _write_cifar100_py(parent: Path) -> tuple[Path, CifarArrays]:
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    classes = [f"fine{i:02d}" for i in range(100)]
    train_x, test_x = _images(12, 2), _images(6, 3)
    train_y = np.array([0, 99, 5, 17, 42, 3, 3, 8, 64, 1, 2, 98], dtype=np.int64)
    test_y = np.array([7, 6, 5, 4, 3, 99], dtype=np.int64)
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        batch = _batch(x, y, b"fine_labels")
        batch[b"coarse_labels"] = [int(v) // 5 for v in y]  # must be ignored
        _dump(batch, folder / split, legacy=False)
    meta = {
        b"fine_label_names": [c.encode() for c in classes],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    _dump(meta, folder / "meta", legacy=False)
    return folder, CifarArrays(train_x, train_y, test_x, test_y, classes)


IMG_CLASSES = ["cat", "dog", "frog"]
IMG_COUNTS = {"train": 3, "test": 2}


def _write_image_folder(root: Path, ext: str = ".png", size: int = 32) -> CifarArrays:
    """Write ``root/{train,test}/<class>/NNNN<ext>``; return the expected arrays (exact for PNG)."""
    expected: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    seed = 10
    for split, count in IMG_COUNTS.items():
        xs, ys = [], []
        for label, cls in enumerate(IMG_CLASSES):
            (root / split / cls).mkdir(parents=True)
            by_name = {}
            # Written out of order so the loader's sorting is exercised.
            for j in reversed(range(count)):
                seed += 1
                rng = np.random.default_rng(seed)
                if ext == ".png":
                    x = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                else:
                    # JPEG mangles noise, so give lossy formats a smooth colour ramp to survive.
                    ramp = np.linspace(-40, 40, size)[:, None, None]
                    x = np.clip(rng.integers(50, 206, 3) + ramp, 0, 255).astype(np.uint8)
                    x = np.broadcast_to(x, (size, size, 3)).copy()
                path = root / split / cls / f"{j:04d}{ext}"
                if split == "train" and cls == "dog" and j == 0:
                    # A greyscale file must come back as RGB with equal channels.
                    Image.fromarray(x[..., 0], mode="L").save(path)
                    x = np.repeat(x[..., :1], 3, axis=2)
                else:
                    Image.fromarray(x).save(path)
                by_name[path.name] = x
            xs += [by_name[n] for n in sorted(by_name)]
            ys += [label] * count
        expected[split] = np.stack(xs), np.array(ys, dtype=np.int64)
    return CifarArrays(*expected["train"], *expected["test"], IMG_CLASSES)


def _tar(folder: Path, out: Path, arcname: str | None = None) -> Path:
    mode = "w" if out.suffix == ".tar" else "w:gz"
    with tarfile.open(out, mode) as tar:
        tar.add(folder, arcname=arcname if arcname is not None else folder.name)
    return out


def _assert_equal(got: CifarArrays, want: CifarArrays) -> None:
    assert got.classes == want.classes
    for field in ("train_x", "train_y", "test_x", "test_y"):
        g, w = getattr(got, field), getattr(want, field)
        assert g.dtype == (np.uint8 if field.endswith("x") else np.int64), field
        np.testing.assert_array_equal(g, w, err_msg=field)


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# --- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["archive", "folder", "parent_folder"])
def test_cifar10_python_format(tmp_path: Path, cache: Path, form: str) -> None:
    folder, want = _write_cifar10_py(tmp_path / "src")
    source = {
        "archive": lambda: _tar(folder, tmp_path / "cifar-10-python.tar.gz"),
        "folder": lambda: folder,
        "parent_folder": lambda: folder.parent,
    }[form]()
    got = load_cifar("cifar10", cache, source=source)
    assert got.train_x.shape == (5 * PER_BATCH, 32, 32, 3)
    _assert_equal(got, want)


@pytest.mark.parametrize("form", ["archive", "folder"])
def test_cifar100_python_format_uses_fine_labels(tmp_path: Path, cache: Path, form: str) -> None:
    folder, want = _write_cifar100_py(tmp_path / "src")
    source = _tar(folder, tmp_path / "cifar-100-python.tar.gz") if form == "archive" else folder
    got = load_cifar("cifar100", cache, source=source)
    assert len(got.classes) == 100
    _assert_equal(got, want)


@pytest.mark.parametrize("form", ["folder", "nested_folder", "tar.gz", "tgz", "tar", "dot_tar"])
def test_image_folder_png_exact(tmp_path: Path, cache: Path, form: str) -> None:
    top = tmp_path / "src" / "mycifar"
    want = _write_image_folder(top)
    source = {
        "folder": top,
        "nested_folder": top.parent,  # layout one level down
        "tar.gz": tmp_path / "a.tar.gz",
        "tgz": tmp_path / "a.tgz",
        "tar": tmp_path / "a.tar",
        "dot_tar": tmp_path / "b.tar.gz",
    }[form]
    if form in ("tar.gz", "tgz", "tar"):
        _tar(top, source)
    elif form == "dot_tar":
        _tar(top, source, arcname=".")  # members named ./train/..., as `tar czf x .` writes them
    got = load_cifar(source=source, root=cache)
    assert got.train_x.shape == (9, 32, 32, 3)
    assert got.test_x.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(got.train_y, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    _assert_equal(got, want)


def test_image_folder_jpeg(tmp_path: Path, cache: Path) -> None:
    want = _write_image_folder(tmp_path / "jpg", ext=".jpg")
    got = load_cifar(source=_tar(tmp_path / "jpg", tmp_path / "jpg.tar.gz"), root=cache)
    assert got.classes == IMG_CLASSES
    assert got.train_x.shape == want.train_x.shape and got.train_x.dtype == np.uint8
    np.testing.assert_array_equal(got.test_y, want.test_y)
    # JPEG is lossy, so check closeness, and that each image landed in its own slot.
    for got_x, want_x in ((got.train_x, want.train_x), (got.test_x, want.test_x)):
        err = np.abs(got_x.astype(float) - want_x).mean(axis=(1, 2, 3))
        assert (err < 3).all(), err


def test_arrays_are_frozen_with_short_repr(tmp_path: Path, cache: Path) -> None:
    _write_image_folder(tmp_path / "src")
    got = load_cifar(source=tmp_path / "src", root=cache)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.train_x = got.test_x  # type: ignore[misc]
    assert repr(got) == "CifarArrays(train_x=(9, 32, 32, 3), test_x=(6, 32, 32, 3), classes=3)"


# --- cache ---------------------------------------------------------------------------------------


def _forbid_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("decoded again instead of loading the cache")

    monkeypatch.setattr(cifar, "_decode_source", fail)


def test_second_load_hits_cache(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_image_folder(tmp_path / "src")
    source = _tar(tmp_path / "src", tmp_path / "src.tar.gz")
    first = load_cifar(source=source, root=cache)
    npz = sorted(cache.iterdir())
    assert [p.name for p in npz] == [npz[0].name]
    assert npz[0].name.startswith("cifar10-") and npz[0].suffix == ".npz"
    assert _no_temp_files(cache)

    _forbid_decode(monkeypatch)
    _assert_equal(load_cifar(source=source, root=cache), first)
    # With no source the cached decode is the next thing tried.
    _assert_equal(load_cifar(root=cache), first)
    assert sorted(cache.iterdir()) == npz


def test_changed_source_is_decoded_again(tmp_path: Path, cache: Path) -> None:
    _write_image_folder(tmp_path / "src")
    source = _tar(tmp_path / "src", tmp_path / "src.tar.gz")
    load_cifar(source=source, root=cache)
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_cifar(source=source, root=cache)
    assert len(list(cache.glob("cifar10-*.npz"))) == 2


def test_damaged_cache_is_rebuilt(tmp_path: Path, cache: Path) -> None:
    want = _write_image_folder(tmp_path / "src")
    load_cifar(source=tmp_path / "src", root=cache)
    (npz,) = cache.glob("*.npz")
    npz.write_bytes(npz.read_bytes()[:1000])
    _assert_equal(load_cifar(source=tmp_path / "src", root=cache), want)
    _assert_equal(load_cifar(root=cache), want)


def test_cache_dir_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_image_folder(tmp_path / "src")
    monkeypatch.setenv("STRUCTLIN_DATA", str(tmp_path / "env"))
    load_cifar(source=tmp_path / "src")
    assert list((tmp_path / "env").glob("cifar10-*.npz"))

    monkeypatch.delenv("STRUCTLIN_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    load_cifar(source=tmp_path / "src")
    assert list((tmp_path / "home" / ".cache" / "structlin").glob("cifar10-*.npz"))


# --- download ------------------------------------------------------------------------------------


def _fake_remote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, md5: str | None = None
) -> CifarArrays:
    folder, want = _write_cifar10_py(tmp_path / "server")
    archive = _tar(folder, tmp_path / "server" / "cifar-10-python.tar.gz")
    real_md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    remote = cifar.Remote(archive.as_uri(), md5 or real_md5, "cifar-10-python.tar.gz")
    monkeypatch.setitem(cifar._REMOTES, "cifar10", remote)
    return want


def test_download_checks_md5_and_caches(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = _fake_remote(tmp_path, monkeypatch)
    _assert_equal(load_cifar("cifar10", cache, download=True), want)
    assert (cache / "cifar-10-python.tar.gz").is_file()
    assert _no_temp_files(cache)

    _forbid_decode(monkeypatch)
    _assert_equal(load_cifar("cifar10", cache), want)


def test_downloaded_archive_is_reused_without_network(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = _fake_remote(tmp_path, monkeypatch)
    load_cifar("cifar10", cache, download=True)
    for npz in cache.glob("*.npz"):
        npz.unlink()
    gone = (tmp_path / "gone.tar.gz").as_uri()
    monkeypatch.setitem(
        cifar._REMOTES, "cifar10", dataclasses.replace(cifar._REMOTES["cifar10"], url=gone)
    )
    _assert_equal(load_cifar("cifar10", cache), want)


def test_download_with_wrong_md5_leaves_nothing(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_remote(tmp_path, monkeypatch, md5="0" * 32)
    with pytest.raises(ValueError, match=r"md5 of file://.* expected 0{32}"):
        load_cifar("cifar10", cache, download=True)
    assert list(cache.iterdir()) == []


def test_failed_download_is_reported(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = (tmp_path / "missing.tar.gz").as_uri()
    monkeypatch.setitem(cifar._REMOTES, "cifar10", cifar.Remote(url, "0" * 32, "c10.tar.gz"))
    with pytest.raises(ConnectionError, match=r"could not download.*source="):
        load_cifar("cifar10", cache, download=True)
    assert list(cache.iterdir()) == []


def test_nothing_cached_without_download(cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no cifar100 data cached.*download=True"):
        load_cifar("cifar100", cache)


# --- errors --------------------------------------------------------------------------------------


def test_unknown_name(cache: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*cifar10"):
        load_cifar("mnist", cache)


def test_missing_source(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*download=True"):
        load_cifar(source=tmp_path / "nope.tar.gz", root=cache)


def test_unrecognised_folder(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "src" / "train").mkdir(parents=True)
    (tmp_path / "src" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"not a recognised CIFAR source.*\{train,test\}"):
        load_cifar(source=tmp_path / "src", root=cache)


def test_missing_test_split(tmp_path: Path, cache: Path) -> None:
    _write_image_folder(tmp_path / "src")
    for f in (tmp_path / "src" / "test").rglob("*.png"):
        f.unlink()
    with pytest.raises(ValueError, match=r"src/test/ has no \.jpg/\.png images"):
        load_cifar(source=tmp_path / "src", root=cache)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_archive(tmp_path: Path, cache: Path, damage: str) -> None:
    _write_image_folder(tmp_path / "src")
    archive = _tar(tmp_path / "src", tmp_path / "src.tar.gz")
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 2] if damage == "truncated" else b"junk\x00" * 1000)
    with pytest.raises(ValueError, match=r"could not read .*src\.tar\.gz as a tar archive"):
        load_cifar(source=archive, root=cache)
    assert not cache.exists() or not list(cache.iterdir())


def test_wrong_image_size(tmp_path: Path, cache: Path) -> None:
    _write_image_folder(tmp_path / "src")
    Image.new("RGB", (28, 28)).save(tmp_path / "src" / "test" / "cat" / "big.png")
    with pytest.raises(ValueError, match=r"test/cat/big\.png .* is 28x28; .* must be 32x32"):
        load_cifar(source=tmp_path / "src", root=cache)


def test_undecodable_image(tmp_path: Path, cache: Path) -> None:
    _write_image_folder(tmp_path / "src")
    (tmp_path / "src" / "train" / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"could not decode train/cat/bad\.jpg"):
        load_cifar(source=tmp_path / "src", root=cache)


def test_class_mismatch(tmp_path: Path, cache: Path) -> None:
    _write_image_folder(tmp_path / "src")
    (tmp_path / "src" / "test" / "frog").rename(tmp_path / "src" / "test" / "toad")
    with pytest.raises(ValueError, match=r"only in train \['frog'\], only in test \['toad'\]"):
        load_cifar(source=tmp_path / "src", root=cache)


def test_python_format_of_the_other_dataset(tmp_path: Path, cache: Path) -> None:
    folder, _ = _write_cifar10_py(tmp_path)
    with pytest.raises(ValueError, match=r"holds CIFAR-10 .* load_cifar\('cifar10'"):
        load_cifar("cifar100", cache, source=folder)


def test_incomplete_python_folder(tmp_path: Path, cache: Path) -> None:
    folder, _ = _write_cifar10_py(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(ValueError, match=r"incomplete CIFAR-10 .* missing \['data_batch_3'\]"):
        load_cifar(source=folder, root=cache)


def test_several_datasets_in_one_folder(tmp_path: Path, cache: Path) -> None:
    _write_cifar10_py(tmp_path / "both")
    _write_image_folder(tmp_path / "both" / "jpeg")
    with pytest.raises(ValueError, match=r"several CIFAR datasets"):
        load_cifar(source=tmp_path / "both", root=cache)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.getenv, ("HOME",))


def test_pickle_with_foreign_objects_is_refused(tmp_path: Path, cache: Path) -> None:
    folder, _ = _write_cifar10_py(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(ValueError, match=r"unexpected object .*getenv"):
        load_cifar(source=folder, root=cache)


# --- real data -----------------------------------------------------------------------------------


def _shared_archive() -> Path:
    env = os.environ.get("STRUCTLIN_SHARED_DATA")
    # tests/lab/data/test_cifar.py -> parents[4] is the folder holding the project and shared/.
    base = Path(env) if env else Path(__file__).resolve().parents[4] / "shared" / "data"
    return base if base.is_file() else base / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cifar_real_cache")


def test_real_shared_cifar10_jpeg(real_cache: Path) -> None:
    archive = _shared_archive()
    if not archive.is_file():
        pytest.skip(
            f"real CIFAR-10 archive not found at {archive}; set STRUCTLIN_SHARED_DATA to the "
            "shared data folder (or the archive itself) to run this test"
        )
    data = load_cifar("cifar10", real_cache, source=archive)
    assert data.train_x.shape == (50000, 32, 32, 3) and data.train_x.dtype == np.uint8
    assert data.test_x.shape == (10000, 32, 32, 3)
    assert data.classes == CLASSES10
    np.testing.assert_array_equal(np.bincount(data.train_y), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(data.test_y), [1000] * 10)
    mean = data.train_x.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(mean, np.array([0.4913, 0.4821, 0.4465]) * 255, atol=1.5)
