"""Downloads the official CIFAR python archives into a local cache (stdlib urllib; no TensorFlow, no TFDS).

``fetch("cifar10")`` returns the path of ``cifar-10-python.tar.gz``, downloading it first if needed. Where:

- ``$ADARESNET_DATA``, else ``~/.cache/adaresnet_jax`` (:func:`cache_dir`), or the ``directory`` argument;
- from ``https://www.cs.toronto.edu/~kriz/<file>``, or ``$ADARESNET_DATA_MIRROR<file>`` (any base URL that
  urllib reads, ``http(s)://`` or ``file:///``) for a cluster's internal mirror.

The final path only ever holds a verified archive: a download goes to its own temporary file in the same
folder, is checked against Content-Length and the MD5, and only then renamed into place (atomically). So a
file at the final path is trusted without hashing it again, a killed download never leaves one, and several
processes (the hosts of one run, on a shared folder) may fetch at once: each writes its own temporary file,
the last rename wins, and every rename puts a complete, verified archive in place. Temporary files left by
killed downloads are never read; those untouched for an hour are deleted by the next fetch.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import IO, NamedTuple

from tqdm import tqdm

from adaresnet_jax.data.errors import DataError

CACHE_ENV = "ADARESNET_DATA"
MIRROR_ENV = "ADARESNET_DATA_MIRROR"
BASE_URL = "https://www.cs.toronto.edu/~kriz/"
_CHUNK = 1 << 20
_STALE_S = 3600.0  # a temporary file untouched this long belongs to a dead download


class Archive(NamedTuple):
    """One downloadable archive: its file name (appended to the base URL) and the MD5 of its bytes."""

    filename: str
    md5: str


ARCHIVES: dict[str, Archive] = {
    "cifar10": Archive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": Archive("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}


class DownloadError(DataError):
    """A download failed; the one-line message names the cause, the URL and the file to place by hand."""


def cache_dir() -> Path:
    """The download folder: ``$ADARESNET_DATA`` if set, else ``~/.cache/adaresnet_jax``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adaresnet_jax"


def archive_url(name: str) -> str:
    """The URL of archive `name`: ``$ADARESNET_DATA_MIRROR`` (or the official site) plus the file name."""
    base = os.environ.get(MIRROR_ENV) or BASE_URL
    return base.rstrip("/") + "/" + _archive(name).filename


def fetch(name: str, directory: str | os.PathLike[str] | None = None, *, url: str | None = None,
          md5: str | None = None, progress: bool | None = None, timeout: float = 60.0,
          or_else: str = "or pass --data-dir") -> Path:
    """The path of archive `name` ("cifar10" or "cifar100") in `directory` (default :func:`cache_dir`).

    An existing file there is returned as is (only a verified download is ever put at that path).
    Otherwise it is downloaded from `url` (default :func:`archive_url`) and checked against `md5` (default
    the official one). `progress`: None shows a tqdm bar when stderr is a terminal, else one line at the
    start and one at the end; True always the bar; False nothing. `timeout` (s) bounds the connection and
    every read. Raises DownloadError (one line; nothing left behind) when anything fails; its advice ends with
    ``or_else``, the calling command's own way round (train.py's default: ``--data-dir``).
    """
    archive = _archive(name)
    folder = Path(directory).expanduser() if directory is not None else cache_dir()
    target = folder / archive.filename
    if target.is_file():
        return target
    url = url or archive_url(name)
    md5 = (md5 or archive.md5).lower()
    tmp: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale(folder, archive.filename)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{archive.filename}.", suffix=".part", dir=folder)
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as out:
            _download(url, out, md5, target, timeout, progress)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, target)
        tmp = None
    except (OSError, HTTPException, ValueError) as e:
        raise DownloadError(f"cannot download {name} from {url} ({_why(e, timeout)}): place {archive.filename} "
                            f"(MD5 {md5}) at {target} by hand, {or_else}") from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return target


def _archive(name: str) -> Archive:
    if name not in ARCHIVES:
        raise DataError(f"no download for '{name}': one of {', '.join(ARCHIVES)}")
    return ARCHIVES[name]


def _download(url: str, out: IO[bytes], md5: str, target: Path, timeout: float, progress: bool | None) -> None:
    """Streams `url` into `out`, with progress on stderr; raises ValueError on a short transfer or a wrong MD5."""
    bar, lines = bool(progress) or (progress is None and sys.stderr.isatty()), progress is None
    digest, done, start = hashlib.md5(), 0, time.monotonic()
    request = urllib.request.Request(url, headers={"User-Agent": "adaresnet-jax"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if lines and not bar:
            size = f"{total / 2**20:.1f} MiB" if total is not None else "unknown size"
            print(f"downloading {url} ({size}) to {target}", file=sys.stderr, flush=True)
        with tqdm(total=total, desc=target.name, unit="B", unit_scale=True, unit_divisor=1024,
                  file=sys.stderr, disable=not bar) as pbar:
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                pbar.update(len(chunk))
    if total is not None and done != total:
        raise ValueError(f"truncated transfer: {done} of {total} bytes")
    if digest.hexdigest() != md5:
        raise ValueError(f"MD5 checksum {digest.hexdigest()} of the {done} bytes received, expected {md5}")
    if lines and not bar:
        print(f"downloaded {target.name}: {done / 2**20:.1f} MiB in {time.monotonic() - start:.1f} s",
              file=sys.stderr, flush=True)


def _remove_stale(folder: Path, filename: str) -> None:
    """Deletes temporary files of `filename` that no download has written to for an hour."""
    for part in folder.glob(f".{filename}.*.part"):
        try:
            if time.time() - part.stat().st_mtime > _STALE_S:
                part.unlink()
        except OSError:
            pass  # gone already (another process), or not ours to delete: never read anyway


def _why(e: BaseException, timeout: float) -> str:
    """A short one-line cause: 'connection refused', 'HTTP 404 Not Found', 'timed out after 60 s', ..."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        if not isinstance(e.reason, BaseException):
            return " ".join(str(e.reason).split())
        e = e.reason
    if isinstance(e, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:] + (f": {e.filename}" if e.filename else "")
    return " ".join(str(e).split()) or type(e).__name__
