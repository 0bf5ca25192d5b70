"""Tests for ``structlin_lab.data.fashion_mnist`` on small synthetic IDX files.

The Debian-package route runs against a fake ``apt-get``/``dpkg-deb``; one ``slow`` test runs the
real route (it needs a Debian/Ubuntu system with current package lists: ``apt-get update``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from structlin_lab.data import FashionMnistArrays, fashion_mnist, load_fashion_mnist

NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# The real runner, saved before the autouse fixture below swaps it out.
_REAL_RUN = fashion_mnist._run
CLASSES = [
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


def _idx(array: np.ndarray, magic: int | None = None) -> bytes:
    """Encode ``array`` (uint8) as an IDX file: magic, big-endian uint32 dims, then the bytes."""
    magic = magic if magic is not None else 0x0800 + array.ndim
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def _arrays(seed: int = 0, n_train: int = 12, n_test: int = 5) -> FashionMnistArrays:
    rng = np.random.default_rng(seed)
    return FashionMnistArrays(
        train_x=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        train_y=rng.integers(0, 10, n_train).astype(np.int64),
        test_x=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        test_y=rng.integers(0, 10, n_test).astype(np.int64),
        classes=CLASSES,
    )


def _raw_files(want: FashionMnistArrays) -> dict[str, bytes]:
    return {name: _idx(getattr(want, field)) for field, name in NAMES.items()}


def _write_source(folder: Path, want: FashionMnistArrays, gz: bool | str = True) -> Path:
    """Write the four IDX files; ``gz="mixed"`` compresses only the image files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in _raw_files(want).items():
        compress = gz is True or (gz == "mixed" and "images" in name)
        path = folder / (f"{name}.gz" if compress else name)
        path.write_bytes(gzip.compress(blob) if compress else blob)
    return folder


def _assert_equal(got: FashionMnistArrays, want: FashionMnistArrays) -> None:
    assert got.classes == CLASSES
    for field in NAMES:
        g, w = getattr(got, field), getattr(want, field)
        assert g.dtype == (np.uint8 if field.endswith("x") else np.int64), field
        np.testing.assert_array_equal(g, w, err_msg=field)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def _no_real_apt(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the slow test may touch the real package manager; others fail fast if they reach it.
    if request.node.get_closest_marker("slow") is None:

        def refuse(cmd: list[str], cwd: Path) -> None:
            raise RuntimeError("apt-get is disabled in tests")

        monkeypatch.setattr(fashion_mnist, "_run", refuse)


# --- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False, "mixed"])
def test_idx_round_trip(tmp_path: Path, cache: Path, gz: bool | str) -> None:
    want = _arrays()
    got = load_fashion_mnist(cache, source=_write_source(tmp_path / "src", want, gz))
    assert got.train_x.shape == (12, 28, 28) and got.test_y.shape == (5,)
    _assert_equal(got, want)
    assert repr(got) == "FashionMnistArrays(train_x=(12, 28, 28), test_x=(5, 28, 28), classes=10)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.train_x = got.test_x  # type: ignore[misc]


def test_gz_is_preferred_when_both_exist(tmp_path: Path, cache: Path) -> None:
    want = _arrays(1)
    src = _write_source(tmp_path / "src", want, gz=True)
    # A stale uncompressed copy next to the .gz must not be read.
    _write_source(src, _arrays(2), gz=False)
    _assert_equal(load_fashion_mnist(cache, source=src), want)


# --- cache ---------------------------------------------------------------------------------------


def _forbid_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("decoded again instead of loading the cache")

    monkeypatch.setattr(fashion_mnist, "_decode", fail)


def test_second_load_hits_cache(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = _arrays()
    src = _write_source(tmp_path / "src", want)
    load_fashion_mnist(cache, source=src)
    (npz,) = cache.iterdir()
    assert npz.name.startswith("fashion-mnist-") and npz.suffix == ".npz"
    _forbid_decode(monkeypatch)
    _assert_equal(load_fashion_mnist(cache, source=src), want)
    _assert_equal(load_fashion_mnist(cache), want)  # no source: the cache is next
    assert list(cache.iterdir()) == [npz]


def test_changed_source_is_decoded_again(tmp_path: Path, cache: Path) -> None:
    src = _write_source(tmp_path / "src", _arrays(1))
    load_fashion_mnist(cache, source=src)
    want = _arrays(2)
    _write_source(src, want)
    labels = src / "t10k-labels-idx1-ubyte.gz"
    st = labels.stat()
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _assert_equal(load_fashion_mnist(cache, source=src), want)
    assert len(list(cache.glob("fashion-mnist-*.npz"))) == 2


def test_damaged_cache_is_rebuilt(tmp_path: Path, cache: Path) -> None:
    want = _arrays()
    src = _write_source(tmp_path / "src", want)
    load_fashion_mnist(cache, source=src)
    (npz,) = cache.glob("*.npz")
    npz.write_bytes(npz.read_bytes()[:500])
    _assert_equal(load_fashion_mnist(cache, source=src), want)
    _assert_equal(load_fashion_mnist(cache), want)


def test_cache_dir_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _write_source(tmp_path / "src", _arrays())
    monkeypatch.setenv("STRUCTLIN_DATA", str(tmp_path / "env"))
    load_fashion_mnist(source=src)
    assert list((tmp_path / "env").glob("fashion-mnist-*.npz"))
    monkeypatch.delenv("STRUCTLIN_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    load_fashion_mnist(source=src)
    assert list((tmp_path / "home" / ".cache" / "structlin").glob("fashion-mnist-*.npz"))


def test_nothing_cached_without_download(cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no Fashion-MNIST data cached.*download=True"):
        load_fashion_mnist(cache)


# --- corrupt sources -----------------------------------------------------------------------------


def _corrupt(tmp_path: Path, name: str, blob: bytes) -> Path:
    src = _write_source(tmp_path / "src", _arrays(), gz=False)
    (src / name).write_bytes(blob)
    return src


@pytest.mark.parametrize(
    ("name", "make_blob", "message"),
    [
        (
            NAMES["train_x"],
            lambda a: b"\x00\x00\x08\x01" + _idx(a.train_x)[4:],
            r"train-images-idx3-ubyte in .* magic number 2049, expected 2051",
        ),
        (
            NAMES["test_y"],
            lambda a: _idx(a.test_x),  # an images file where labels belong
            r"t10k-labels-idx1-ubyte in .* magic number 2051, expected 2049",
        ),
        (NAMES["test_y"], lambda a: b"\x00\x08", r"magic number None, expected 2049"),
        (
            NAMES["train_x"],
            lambda a: _idx(a.train_x)[:-7],
            r"holds 9401 data bytes but its header \(12, 28, 28\) needs 9408",
        ),
        (
            NAMES["test_x"],
            lambda a: _idx(np.zeros((2, 32, 32), np.uint8)),
            r"dimensions \(2, 32, 32\), expected \(N, 28, 28\)",
        ),
        (NAMES["test_x"], lambda a: _idx(a.test_x)[:10], r"truncated inside its IDX header"),
        (
            NAMES["train_y"],
            lambda a: _idx(np.array([0, 1, 10] + [0] * 9, np.uint8)),
            r"has label 10; Fashion-MNIST labels are 0\.\.9",
        ),
        (
            NAMES["train_y"],
            lambda a: _idx(a.train_y[:-1]),
            r"holds 12 train images but 11 train labels",
        ),
    ],
)
def test_corrupt_idx(
    tmp_path: Path,
    cache: Path,
    name: str,
    make_blob: Callable[[FashionMnistArrays], bytes],
    message: str,
) -> None:
    src = _corrupt(tmp_path, name, make_blob(_arrays()))
    with pytest.raises(ValueError, match=message):
        load_fashion_mnist(cache, source=src)
    assert not cache.exists()


def test_corrupt_gzip(tmp_path: Path, cache: Path) -> None:
    src = _write_source(tmp_path / "src", _arrays())
    path = src / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"could not decompress .*train-images-idx3-ubyte\.gz"):
        load_fashion_mnist(cache, source=src)


def test_missing_source_files(tmp_path: Path, cache: Path) -> None:
    src = _write_source(tmp_path / "src", _arrays())
    (src / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['t10k-labels-idx1-ubyte'\].*download"):
        load_fashion_mnist(cache, source=src)
    with pytest.raises(FileNotFoundError, match=r"nope does not exist.*source="):
        load_fashion_mnist(cache, source=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_fashion_mnist(cache, source=src / "train-images-idx3-ubyte.gz")


# --- download ------------------------------------------------------------------------------------


def _serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, want: FashionMnistArrays) -> None:
    """Point the official URLs at local file:// copies with their true md5s."""
    server = _write_source(tmp_path / "server", want)
    for name in NAMES.values():
        path = server / f"{name}.gz"
        md5 = hashlib.md5(path.read_bytes()).hexdigest()
        remote = fashion_mnist.Remote(path.as_uri(), md5, path.name)
        monkeypatch.setitem(fashion_mnist._REMOTES, name, remote)


def test_download_checks_md5_and_caches(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = _arrays()
    _serve(tmp_path, monkeypatch, want)
    _assert_equal(load_fashion_mnist(cache, download=True), want)
    names = sorted(p.name for p in (cache / "fashion-mnist").iterdir())
    assert names == sorted(f"{n}.gz" for n in NAMES.values())
    assert (cache / "fashion-mnist.npz").is_file()
    assert not list(cache.rglob("*.tmp"))

    _forbid_decode(monkeypatch)
    _assert_equal(load_fashion_mnist(cache), want)


def test_downloaded_files_are_reused_without_network(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = _arrays()
    _serve(tmp_path, monkeypatch, want)
    load_fashion_mnist(cache, download=True)
    (cache / "fashion-mnist.npz").unlink()
    shutil.rmtree(tmp_path / "server")
    _assert_equal(load_fashion_mnist(cache), want)


def test_wrong_md5_leaves_nothing_and_reports_both_routes(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(tmp_path, monkeypatch, _arrays())
    name = NAMES["train_y"]
    bad = dataclasses.replace(fashion_mnist._REMOTES[name], md5="0" * 32)
    monkeypatch.setitem(fashion_mnist._REMOTES, name, bad)
    with pytest.raises(ValueError, match=r"md5 of file://.* expected 0{32}.*Debian.*disabled"):
        load_fashion_mnist(cache, download=True)
    assert not (cache / "fashion-mnist" / f"{name}.gz").exists()
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob("*.npz"))


def test_failed_download_is_reported(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = NAMES["train_x"]
    gone = fashion_mnist.Remote((tmp_path / "gone.gz").as_uri(), "0" * 32, "x.gz")
    monkeypatch.setitem(fashion_mnist._REMOTES, name, gone)
    with pytest.raises(ConnectionError, match=r"could not download .*source=.*Debian package"):
        load_fashion_mnist(cache, download=True)


# --- the Debian route ----------------------------------------------------------------------------


class FakeApt:
    """Stands in for ``_run``: apt-get writes a .deb, dpkg-deb extracts IDX files from it."""

    def __init__(self, files: dict[str, bytes], data_dir: str = fashion_mnist._DEB_DATA_DIR):
        self.files, self.data_dir, self.calls = files, data_dir, []

    def __call__(self, cmd: list[str], cwd: Path) -> None:
        self.calls.append(cmd)
        if cmd[:2] == ["apt-get", "download"]:
            (cwd / f"{cmd[2]}_0.0~git20200523.55506a9-1_all.deb").write_bytes(b"!<arch>\n")
        elif cmd[:2] == ["dpkg-deb", "-x"]:
            out = Path(cmd[3]) / self.data_dir
            out.mkdir(parents=True)
            for name, blob in self.files.items():
                (out / f"{name}.gz").write_bytes(gzip.compress(blob, mtime=0))
        else:
            raise AssertionError(f"unexpected command {cmd}")


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NAMES.values():
        remote = fashion_mnist._REMOTES[name]
        url = (tmp_path / "offline" / remote.filename).as_uri()
        monkeypatch.setitem(fashion_mnist._REMOTES, name, dataclasses.replace(remote, url=url))


def _trust(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> None:
    """Make the content md5s the Debian route checks those of ``files``."""
    trusted = tuple(
        dataclasses.replace(f, md5_raw=hashlib.md5(files[f.name]).hexdigest())
        for f in fashion_mnist._FILES
    )
    monkeypatch.setattr(fashion_mnist, "_FILES", trusted)


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("data_dir", [fashion_mnist._DEB_DATA_DIR, "usr/share/fmnist/data"])
def test_debian_fallback(cache: Path, monkeypatch: pytest.MonkeyPatch, data_dir: str) -> None:
    want = _arrays(3)
    files = _raw_files(want)
    _trust(monkeypatch, files)
    apt = FakeApt(files, data_dir)
    monkeypatch.setattr(fashion_mnist, "_run", apt)
    _assert_equal(load_fashion_mnist(cache, download=True), want)
    assert [c[:2] for c in apt.calls] == [["apt-get", "download"], ["dpkg-deb", "-x"]]
    assert apt.calls[0][2] == "dataset-fashion-mnist"
    assert apt.calls[1][2].endswith("_all.deb")
    assert (cache / "fashion-mnist.npz").is_file()
    assert not Path(apt.calls[1][3]).exists()  # the temp dir was removed

    _forbid_decode(monkeypatch)
    _assert_equal(load_fashion_mnist(cache), want)
    assert len(apt.calls) == 2


@pytest.mark.usefixtures("offline")
def test_debian_content_md5_is_checked(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real md5s stay in place, so synthetic files must be refused.
    monkeypatch.setattr(fashion_mnist, "_run", FakeApt(_raw_files(_arrays())))
    with pytest.raises(
        ConnectionError, match=r"could not download.*train-images-idx3-ubyte .* content md5"
    ):
        load_fashion_mnist(cache, download=True)
    assert not cache.exists() or not list(cache.rglob("*.npz"))


def test_run_reports_failures(tmp_path: Path) -> None:
    # The real runner, on harmless commands.
    script = "import sys; sys.stderr.write('E: Unable to locate package x'); sys.exit(100)"
    with pytest.raises(RuntimeError, match=r"exit code 100 \(run `apt-get update`.*locate package"):
        _REAL_RUN([sys.executable, "-c", script], cwd=tmp_path)
    with pytest.raises(RuntimeError, match="not-a-real-tool not found"):
        _REAL_RUN(["not-a-real-tool"], cwd=tmp_path)
    _REAL_RUN([sys.executable, "-c", "pass"], cwd=tmp_path)  # success: no error


# --- real data -----------------------------------------------------------------------------------


@pytest.fixture
def _real_tools() -> Iterator[None]:
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("the Debian route needs apt-get and dpkg-deb (a Debian/Ubuntu system)")
    yield


@pytest.mark.slow
@pytest.mark.usefixtures("offline", "_real_tools")
def test_real_debian_package(cache: Path) -> None:
    try:
        data = load_fashion_mnist(cache, download=True)
    except ConnectionError as e:
        if "apt-get update" in str(e) or "Temporary failure" in str(e):
            pytest.skip(f"package {fashion_mnist._DEB_PACKAGE} is not reachable here: {e}")
        raise
    assert data.train_x.shape == (60000, 28, 28) and data.train_x.dtype == np.uint8
    assert data.test_x.shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(data.train_y), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(data.test_y), [1000] * 10)
    assert abs(float(data.train_x.mean()) - 72.94) < 0.01
    assert data.classes == CLASSES
