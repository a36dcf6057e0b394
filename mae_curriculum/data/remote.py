"""Shards in object storage or on a web server: a small fsspec layer with retries, streaming and a local cache.

Locations: ``s3://bucket/prefix`` (s3fs: ``pip install -e ".[s3]"``), ``gs://`` / ``gcs://`` (gcsfs: ``".[gcs]"``),
``http://`` / ``https://`` (fsspec's HTTP over aiohttp, which s3fs also brings: ``".[http]"``). Anything else with
``://`` and ``pipe:`` commands are refused (:func:`check_location`).

Credentials and endpoints come only from each library's own environment and config files, never from ours: for
S3 botocore's chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``~/.aws/config``, instance roles) and ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for an S3-compatible store
(botocore >= 1.31 reads them; tests/test_remote_shards.py points it at a local server that way); for GCS
``GOOGLE_APPLICATION_CREDENTIALS`` or gcloud's defaults.

Reading a shard (:func:`open_shard`) is one sequential stream: a single GET streams the object front to back
(fsspec's ``open_async``), :class:`RemoteFile` gives tarfile the seekable view it needs (forward seeks read and
drop bytes, short backward seeks are served from the last ``LOOKBACK`` bytes), so there are never per-sample
requests. A transient error (connection reset, timeout, HTTP 5xx / 408 / 429, an early end of the body) is
retried ``RETRIES`` times with exponential backoff, the stream picking up where it stopped (a ranged read on
object stores; HTTP restarts from the beginning and drops the bytes already read); a permanent one (not found,
forbidden) is not. What still fails is raised as :class:`OSError`, which the loader logs before replacing the
shard's samples, exactly as for a missing local shard.

``cache_dir`` (``data.cache_dir``): a read-through cache for data sets read many times. A shard is downloaded once
into ``cache_dir`` (written as a ``.partial`` file, its size checked against the object's, then renamed: a cache
file under its final name is always complete) and read locally from then on; a cached copy whose size no longer
matches the object is fetched again. Nothing is evicted. Several processes may fill the same entry at once: each
writes its own partial file and the renames are atomic.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

log = logging.getLogger(__name__)

SCHEMES = ("s3", "gs", "gcs", "http", "https")
RETRIES = 4  # extra attempts after a transient error (5 in all)
BACKOFF_S = 0.5  # first wait; doubled per attempt (with jitter), capped at BACKOFF_MAX_S
BACKOFF_MAX_S = 8.0
CHUNK = 1 << 20  # bytes asked from the stream per read
LOOKBACK = 64 << 10  # bytes kept behind the read position for tarfile's short backward seeks
RANGE_BLOCK = 8 << 20  # request size of the ranged reader (a resumed stream, or a library without open_async)
_EXTRAS = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._\-+=@,~/]*")

T = TypeVar("T")


class RemoteError(OSError):
    """A remote object that could not be read (after the retries, for a transient error)."""


def scheme_of(location: str | os.PathLike) -> str | None:
    """The URL scheme of ``location`` (``"s3"``, ``"https"``, ...) or None for a local path."""
    text = str(location)
    head, sep, _ = text.partition("://")
    return head.lower() if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", head) else None


def is_remote(location: str | os.PathLike) -> bool:
    return scheme_of(location) is not None


def check_location(value: str, key: str) -> str | None:
    """Why ``value`` cannot be a shard location (one line), or None: ``pipe:`` commands and unknown schemes."""
    if value.startswith("pipe:") or "pipe:" in value:
        return f"{key}: no 'pipe:' commands (shards are read, never run); got {value!r}"
    scheme = scheme_of(value)
    if "://" in value and scheme not in SCHEMES:
        return f"{key}: only local folders and {', '.join(s + '://' for s in SCHEMES)} locations are accepted; " \
               f"got {value!r}"
    if scheme is not None and not value.split("://", 1)[1].strip("/"):
        return f"{key}: {value!r} names no bucket or host"
    return None


def join(root: str, name: str) -> str:
    """``root/name`` for a remote root; ``name`` must be a plain relative key (no ``..``, no URL syntax)."""
    if not _KEY_RE.fullmatch(name) or ".." in name.split("/") or "//" in name:
        raise ValueError(f"{name!r} is not a plain relative object name")
    return f"{root.rstrip('/')}/{name}"


def _filesystem(url: str):
    """(fsspec filesystem, path) for ``url``; a missing optional library is a one-line error."""
    import fsspec

    scheme = scheme_of(url)
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise RemoteError(f"{scheme}:// locations need an extra package ({e.name or e}): "
                          f"pip install -e \".[{_EXTRAS.get(scheme or '', scheme)}]\"") from None


def transient(e: BaseException) -> bool:
    """Whether ``e`` may go away on a retry (network trouble, 5xx / 408 / 429), not a missing or forbidden object."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
                      TypeError, NotImplementedError, RemoteError)):
        return False
    status = getattr(e, "status", None)
    return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429))


def retrying(what: str, fn: Callable[[], T], retries: int | None = None) -> T:
    """``fn()``, retried after transient errors with exponential backoff; raises :class:`RemoteError` (an
    OSError; FileNotFoundError for a missing object) with the last reason."""
    retries = RETRIES if retries is None else retries
    for attempt in range(retries + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - each library raises its own types; classified by transient()
            if not transient(e) or attempt == retries:
                tries = f" after {attempt + 1} tries" if attempt else ""
                raise RemoteError(f"{what}: {type(e).__name__}: {e}{tries}") from None
            wait = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** attempt) * random.uniform(0.75, 1.0)
            log.warning("%s: %s: %s; retry %d/%d in %.1f s", what, type(e).__name__, e, attempt + 1, retries, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------------------
# metadata and small files
# --------------------------------------------------------------------------------------------------------------


def size(url: str) -> int:
    """The object's size in bytes (FileNotFoundError when there is none)."""
    fs, path = _filesystem(url)
    info = retrying(url, lambda: fs.info(path))
    if info.get("type") == "directory" or info.get("size") is None:
        raise FileNotFoundError(f"{url}: not an object")
    return int(info["size"])


def exists(url: str) -> bool:
    try:
        size(url)
        return True
    except FileNotFoundError:
        return False


def read_bytes(url: str, limit: int) -> bytes:
    """The bytes of a small object, refused (:class:`RemoteError`) over ``limit`` bytes."""
    n = size(url)
    if n > limit:
        raise RemoteError(f"{url}: {n} bytes, over the {limit}-byte limit")
    fs, path = _filesystem(url)
    data = retrying(url, lambda: fs.cat_file(path))
    if len(data) != n:
        raise RemoteError(f"{url}: read {len(data)} of its {n} bytes")
    return data


def read_text(url: str, limit: int) -> str:
    return read_bytes(url, limit).decode("utf-8")


def sizes(root: str, names: list[str]) -> dict[str, int]:
    """{name: size} of the objects ``root/name`` that exist: one listing on object stores (a HEAD per name where
    listing is not allowed, and on HTTP). Unreachable ones are logged and left out, like missing ones."""
    fs, path = _filesystem(root)
    found: dict[str, int] = {}
    if scheme_of(root) not in ("http", "https"):
        try:
            listing = retrying(root, lambda: fs.ls(path, detail=True, refresh=True))
            by_name = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e for e in listing if e.get("type") == "file"}
            wanted = {n: n.rsplit("/", 1)[-1] for n in names if "/" not in n}
            found = {n: int(by_name[b]["size"]) for n, b in wanted.items() if b in by_name}
            names = [n for n in names if "/" in n]  # nested names: asked one by one
        except OSError as e:
            log.info("%s: cannot list (%s): asking for each shard", root, e)
    for n in names:
        try:
            found[n] = size(join(root, n))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("%s", e)
    return found


# --------------------------------------------------------------------------------------------------------------
# streaming a shard
# --------------------------------------------------------------------------------------------------------------


class _Stream:
    """The object's bytes from ``start`` on, one request: a streamed GET (fsspec ``open_async``) or, for a
    resumed object-store stream and libraries without ``open_async``, fsspec's ranged file."""

    def __init__(self, url: str, start: int, size: int | None = None):
        from fsspec.asyn import sync

        self.fs, self.path = _filesystem(url)
        self._sync = sync
        self._async = None
        self._file = None
        ranged = start > 0 and scheme_of(url) not in ("http", "https")
        if not ranged and hasattr(self.fs, "open_async"):
            try:
                kw = {"size": size} if scheme_of(url) in ("http", "https") else {}  # (no second HEAD)
                self._async = sync(self.fs.loop, self.fs.open_async, self.path, "rb", **kw)
            except NotImplementedError:
                self._async = None
        self.pos = 0  # a streamed GET starts at byte 0 (the caller drops what it already has)
        if self._async is None:
            self._file = self.fs.open(self.path, "rb", block_size=RANGE_BLOCK, cache_type="readahead")
            self.pos = self._file.seek(start)

    def read(self, n: int) -> bytes:
        data = self._sync(self.fs.loop, self._async.read, n) if self._async is not None else self._file.read(n)
        self.pos += len(data)
        return data

    def close(self) -> None:
        try:
            if self._async is not None:
                body = getattr(self._async, "r", None)  # the streamed response: release its connection now
                if body is not None:
                    body.close()
                self._sync(self.fs.loop, self._async.close)
            elif self._file is not None:
                self._file.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass


class RemoteFile:
    """A read-only, seekable file over one remote object of ``size`` bytes, read as one sequential stream (see the
    module docstring). Raises :class:`RemoteError` (an OSError) when the object cannot be read."""

    def __init__(self, url: str, size: int):
        self.url, self.size = url, size
        self.pos = 0
        self.requests = 0  # streams opened (1 unless an error or a long backward seek reopened it)
        self._win = bytearray()  # the bytes [_start, _start + len(_win)) of the object
        self._start = 0
        self._stream: _Stream | None = None
        self.closed = False

    # -- the stream, with retries
    def _more(self) -> bool:
        """Append the next chunk to the window; False at the end of the object."""
        end = self._start + len(self._win)
        if end >= self.size:
            return False

        def attempt() -> bytes:
            if self._stream is None:
                self._stream = _Stream(self.url, end, self.size)
                self.requests += 1
                while self._stream.pos < end:  # an HTTP stream restarted from 0: drop what we have
                    if not self._stream.read(min(CHUNK, end - self._stream.pos)):
                        break
            data = self._stream.read(min(CHUNK, self.size - end)) if self._stream.pos == end else b""
            if not data:
                self._drop_stream()
                raise ConnectionError(f"the stream ended at byte {end} of {self.size}")
            return data

        def guarded() -> bytes:
            try:
                return attempt()
            except Exception:
                self._drop_stream()
                raise

        self._win += retrying(self.url, guarded)
        return True

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    # -- the file interface tarfile and the loader use
    def read(self, n: int = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed file")
        stop = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if self.pos < self._start:  # a long backward seek: start over
            self._drop_stream()
            self._win, self._start = bytearray(), 0
        while (end := self._start + len(self._win)) < stop:
            keep_from = min(max(self._start, self.pos - LOOKBACK), end)  # bound memory while skipping
            del self._win[: keep_from - self._start]
            self._start = keep_from
            if not self._more():
                break
        lo = max(0, self.pos - self._start)
        data = bytes(self._win[lo: lo + max(0, stop - self.pos)])
        self.pos += len(data)
        cut = self.pos - LOOKBACK - self._start
        if cut > 0:
            del self._win[:cut]
            self._start += cut
        return data

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        if base + pos < 0:
            raise OSError("negative seek position")
        self.pos = base + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._drop_stream()
        self._win = bytearray()
        self.closed = True

    def __enter__(self) -> "RemoteFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------
# the entry point of the loader, and the read-through cache
# --------------------------------------------------------------------------------------------------------------


def cache_path(url: str, cache_dir: str | os.PathLike) -> Path:
    """Where ``url`` is cached: ``cache_dir/<16 hex of sha1(url)>-<object name>``."""
    digest = hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._\-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[:100]
    return Path(cache_dir) / f"{digest}-{name}"


def cached_copy(url: str, n: int, cache_dir: str | os.PathLike) -> Path:
    """A complete local copy of ``url`` (``n`` bytes) in ``cache_dir``, downloaded if missing or of another size."""
    path = cache_path(url, cache_dir)
    if path.is_file() and path.stat().st_size == n:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with RemoteFile(url, n) as src, open(tmp, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
            written = dst.tell()
        if written != n:
            raise RemoteError(f"{url}: cached {written} of its {n} bytes")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def open_shard(location: str | os.PathLike, cache_dir: str = "") -> tuple[BinaryIO, int]:
    """(readable seekable file, size in bytes) of a shard: a local file, a cached copy of a remote one (with
    ``cache_dir``), or a :class:`RemoteFile` streaming it. Raises OSError when it cannot be opened."""
    if not is_remote(location):
        f = open(location, "rb")
        return f, os.fstat(f.fileno()).st_size
    url = str(location)
    n = size(url)
    if cache_dir:
        f = open(cached_copy(url, n, cache_dir), "rb")
        return f, n
    return RemoteFile(url, n), n  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------
# writing (the shard writer's output)
# --------------------------------------------------------------------------------------------------------------


def upload(local: str | os.PathLike, url: str) -> None:
    """Copy a local file to ``url`` (one PUT or a multipart upload: the object appears whole or not at all)."""
    if scheme_of(url) in ("http", "https"):
        raise RemoteError(f"{url}: http(s) locations are read-only; write shards to s3:// or gs://")
    fs, path = _filesystem(url)
    retrying(url, lambda: fs.put_file(str(local), path))


def listdir(root: str) -> list[str]:
    """Object names directly under ``root`` (empty when there is none)."""
    fs, path = _filesystem(root)
    try:
        listing = retrying(root, lambda: fs.ls(path, detail=False, refresh=True))
    except FileNotFoundError:
        return []
    return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in listing]


def remove(url: str) -> None:
    fs, path = _filesystem(url)
    retrying(url, lambda: fs.rm_file(path))


__all__ = ["RemoteError", "RemoteFile", "SCHEMES", "cache_path", "cached_copy", "check_location", "exists",
           "is_remote", "join", "listdir", "open_shard", "read_text", "remove", "retrying", "scheme_of", "size",
           "sizes", "transient", "upload"]
