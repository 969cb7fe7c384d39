"""Tests for adaresnet_jax.data.download, its CLI and the download path of load_dataset / train.py.

All offline: a local HTTP server (127.0.0.1, port 0, in a thread) serves a small archive in the CIFAR-10
layout; a refused connection is a free port with nothing listening.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from adaresnet_jax import train as T
from adaresnet_jax.data import DataError, DownloadError, cache_dir, download, fetch, load_dataset
from helpers import count_compiles, free_port

ROOT = Path(__file__).resolve().parents[1]
FILE = "cifar-10-python.tar.gz"
REAL_MD5 = "c58f30108f718f92721af3b95e74349a"


@pytest.fixture(scope="module")
def archive() -> tuple[bytes, np.ndarray]:
    """A cifar-10-python.tar.gz with five train batches of 2 images and a test batch of 3 (labels 0, 1, ...):
    its bytes and all its images (train then test) as NHWC."""
    rng = np.random.default_rng(0)
    buf, images = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member, n in [*((f"data_batch_{i}", 2) for i in range(1, 6)), ("test_batch", 3)]:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            blob = pickle.dumps({b"data": data, b"labels": list(range(n))}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return buf.getvalue(), np.concatenate(images)


@pytest.fixture(autouse=True)
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A private cache folder, no mirror unless a test sets one, and no proxy between us and 127.0.0.1."""
    monkeypatch.setenv("ADARESNET_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("ADARESNET_DATA_MIRROR", raising=False)
    monkeypatch.setenv("no_proxy", "*")


def use_md5_of(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the test archive the expected cifar10 archive."""
    monkeypatch.setitem(download.ARCHIVES, "cifar10", download.Archive(FILE, hashlib.md5(body).hexdigest()))


@contextlib.contextmanager
def serve(body: bytes, *, send: int | None = None,
          gate: threading.Barrier | None = None) -> Iterator[tuple[str, list[str]]]:
    """Serves `body` at /cifar-10-python.tar.gz (404 elsewhere): yields (base URL, paths requested so far).

    With `send`, announces the full Content-Length but sends only `send` bytes and closes. With `gate`,
    each request waits there first (so concurrent requests are all in flight together)."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            if gate is not None:
                gate.wait()
            if self.path != "/" + FILE:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:send])

        def log_message(self, *args: object) -> None:  # keep the test output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", hits
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def refused_url() -> str:
    """A base URL on a port where nothing listens."""
    return f"http://127.0.0.1:{free_port()}/"


# ----------------------------------------------------------------------------- fetch and load_dataset

def test_download_verifies_loads_and_is_reused(archive: tuple[bytes, np.ndarray], monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    body, images = archive
    use_md5_of(body, monkeypatch)
    cache = cache_dir()
    cache.mkdir()
    dead, live = cache / f".{FILE}.dead.part", cache / f".{FILE}.live.part"  # left by other downloads
    dead.write_bytes(body[:10])
    live.write_bytes(body[:10])
    os.utime(dead, (time.time() - 7200,) * 2)  # untouched for two hours: its download is gone
    with serve(body) as (base, hits):
        monkeypatch.setenv("ADARESNET_DATA_MIRROR", base)
        ds = load_dataset("cifar10", val_split=0.2)
        err = capsys.readouterr().err.splitlines()
        again = load_dataset("cifar10", max_test=1)
        assert fetch("cifar10") == cache / FILE
        assert hits == ["/" + FILE]  # one download; later calls take the cached file
    assert hashlib.md5((cache / FILE).read_bytes()).digest() == hashlib.md5(body).digest()
    assert (cache / FILE).stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in cache.iterdir()) == sorted([live.name, FILE])  # the dead temp file is gone
    assert ds.num_classes == 10 and (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (8, 2, 3)
    np.testing.assert_array_equal(ds.x_test, images[10:])
    np.testing.assert_array_equal(np.concatenate([again.x_train, again.x_test]), images[:11])
    assert ds.y_test.tolist() == [0, 1, 2]
    # stderr is not a terminal here: one start line and one end line, no carriage returns
    assert len(err) == 2 and "\r" not in "".join(err), err
    assert err[0].startswith(f"downloading {base}{FILE} (") and err[0].endswith(f"to {cache / FILE}")
    assert err[1].startswith(f"downloaded {FILE}: ")


def test_file_mirror_and_explicit_directory(archive: tuple[bytes, np.ndarray], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    body = archive[0]
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / FILE).write_bytes(body)
    monkeypatch.setenv("ADARESNET_DATA_MIRROR", (tmp_path / "mirror").as_uri())  # no trailing slash
    path = fetch("cifar10", tmp_path / "data", md5=hashlib.md5(body).hexdigest().upper(), progress=False)
    assert path == tmp_path / "data" / FILE and path.read_bytes() == body
    assert not cache_dir().exists()


def test_truncated_transfer_leaves_nothing(archive: tuple[bytes, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    body = archive[0]
    use_md5_of(body, monkeypatch)
    half = len(body) // 2
    with serve(body, send=half) as (base, hits):
        with pytest.raises(DownloadError) as e:
            fetch("cifar10", url=base + FILE, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and f"(truncated transfer: {half} of {len(body)} bytes)" in msg, msg
    assert f"place {FILE} (MD5 {hashlib.md5(body).hexdigest()}) at {cache_dir() / FILE} by hand" in msg
    assert hits == ["/" + FILE] and list(cache_dir().iterdir()) == []


def test_wrong_checksum_leaves_nothing(archive: tuple[bytes, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    body = archive[0]  # served as cifar10, but the official MD5 is expected
    with serve(body) as (base, _):
        monkeypatch.setenv("ADARESNET_DATA_MIRROR", base)
        with pytest.raises(DownloadError) as e:
            load_dataset("cifar10")
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, DataError)
    assert f"(MD5 checksum {hashlib.md5(body).hexdigest()} of the {len(body)} bytes received, expected {REAL_MD5})" \
        in msg, msg
    assert list(cache_dir().iterdir()) == []


def test_refused_http_error_timeout_and_unwritable_folder(archive: tuple[bytes, np.ndarray], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url = refused_url() + FILE
    with pytest.raises(DownloadError) as e:
        fetch("cifar10", url=url)
    assert str(e.value) == (f"cannot download cifar10 from {url} (connection refused): place {FILE} "
                            f"(MD5 {REAL_MD5}) at {cache_dir() / FILE} by hand, or pass --data-dir")
    assert list(cache_dir().iterdir()) == []
    with serve(archive[0]) as (base, _):  # serves only the CIFAR-10 file
        monkeypatch.setenv("ADARESNET_DATA_MIRROR", base)
        with pytest.raises(DownloadError, match=r"cannot download cifar100 from http://127\.0\.0\.1:\d+/"
                           r"cifar-100-python\.tar\.gz \(HTTP 404 Not Found\): place cifar-100-python\.tar\.gz "
                           r"\(MD5 eb9058c3a382ffc7106e4002c42a8d85\)"):
            load_dataset("cifar100")
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(DownloadError, match=r"\(timed out after 0\.5 s\)"):
            fetch("cifar10", url=f"http://127.0.0.1:{silent.getsockname()[1]}/{FILE}", timeout=0.5)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DownloadError, match=rf"\(not a directory: {tmp_path}/file/sub\): place .* at "
                                            rf"{tmp_path}/file/sub/{FILE} by hand"):
        fetch("cifar10", tmp_path / "file" / "sub", url=url)
    with pytest.raises(DataError, match="no download for 'mnist'"):
        fetch("mnist")


def test_concurrent_fetches_into_one_folder(archive: tuple[bytes, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes of one run fetching into a shared folder: both download, both rename, one good file."""
    body = archive[0]
    use_md5_of(body, monkeypatch)
    with serve(body, gate=threading.Barrier(2, timeout=30)) as (base, hits):
        with ThreadPoolExecutor(2) as pool:
            paths = list(pool.map(lambda _: fetch("cifar10", url=base + FILE, progress=False), range(2)))
    assert hits == ["/" + FILE] * 2 and paths == [cache_dir() / FILE] * 2
    assert [p.name for p in cache_dir().iterdir()] == [FILE] and paths[0].read_bytes() == body


# ----------------------------------------------------------------------------- command line

def run_cli(*args: str, mirror: str, code: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADARESNET_DATA_MIRROR": mirror, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, *(code or ["-m", "adaresnet_jax.data"]), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_cli_download(archive: tuple[bytes, np.ndarray], tmp_path: Path) -> None:
    body = archive[0]
    # `python -m` is runpy.run_module(..., run_name="__main__", alter_sys=True); run that way, after making
    # the test archive the expected one (the MD5 is the first argument).
    patched = ["-c", "import runpy, sys; from adaresnet_jax.data import download as d; "
                     "d.ARCHIVES['cifar10'] = d.ARCHIVES['cifar10']._replace(md5=sys.argv.pop(1)); "
                     "runpy.run_module('adaresnet_jax.data', run_name='__main__', alter_sys=True)",
               hashlib.md5(body).hexdigest()]
    with serve(body) as (base, hits):
        ok = run_cli("download", "cifar10", "--dir", str(tmp_path / "d"), mirror=base, code=patched)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"{tmp_path / 'd' / FILE}\n" and (tmp_path / "d" / FILE).read_bytes() == body
    assert hits == ["/" + FILE] and len(ok.stderr.splitlines()) == 2  # start and end lines
    url = refused_url()
    bad = run_cli("download", "cifar10", "--dir", str(tmp_path / "e"), mirror=url)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == (f"error: cannot download cifar10 from {url}{FILE} (connection refused): place {FILE} "
                          f"(MD5 {REAL_MD5}) at {tmp_path / 'e' / FILE} by hand, or pass --dir the folder that holds it\n")
    assert list((tmp_path / "e").iterdir()) == []


def test_cli_download_without_a_name_lists_the_names() -> None:
    out = run_cli("download", mirror="http://127.0.0.1:9/")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("error: name the data set to download: one of cifar10, cifar100 "
                          "(python -m adaresnet_jax.data download cifar10)\n"), out.stderr


# ----------------------------------------------------------------------------- train.py

def test_train_reports_failed_download_before_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    url = refused_url()
    monkeypatch.setenv("ADARESNET_DATA_MIRROR", url)
    capsys.readouterr()
    with count_compiles() as n:
        rc = T.main(["--dataset", "cifar10", "--model", "tiny", "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and n[0] == 0, err
    assert err == (f"train.py: error: cannot download cifar10 from {url}{FILE} (connection refused): place {FILE} "
                   f"(MD5 {REAL_MD5}) at {tmp_path / 'cache' / FILE} by hand, or pass --data-dir\n")
