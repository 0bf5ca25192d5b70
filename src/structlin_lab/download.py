"""Downloads for the lab's data sets: the data cache location and checked, atomic downloads."""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from structlin.io import atomic_write

__all__ = ["Remote", "cache_dir", "download"]


@dataclass(frozen=True)
class Remote:
    """A downloadable file: where it lives, its md5, and the name it is cached under."""

    url: str
    md5: str
    filename: str


def cache_dir(root: str | Path | None) -> Path:
    """``root`` if given, else ``$STRUCTLIN_DATA``, else ``~/.cache/structlin``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("STRUCTLIN_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "structlin"


def download(url: str, dest: Path, md5: str, *, fetch_hint: str) -> None:
    """Stream ``url`` into ``dest`` atomically, checking its md5 before the file appears.

    ``fetch_hint`` ends the error message of a failed download, telling the user what to do
    instead (e.g. ``"fetch it by other means and pass source=<path to ...>"``).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger(__name__).info("downloading %s to %s", url, dest)
    digest = hashlib.md5(usedforsecurity=False)

    def write(f: Any) -> None:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(f"could not download {url}: {e}; {fetch_hint}") from e
        if digest.hexdigest() != md5:
            # Raising inside the atomic write deletes the temp file, so nothing bad is left behind.
            raise ValueError(
                f"md5 of {url} is {digest.hexdigest()}, expected {md5}; the download "
                "is corrupt or was altered: retry, or fetch it by other means and pass source=..."
            )

    atomic_write(dest, write)
