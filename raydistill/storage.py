"""Local or ``s3://`` storage behind one small path type, on pyarrow's filesystems.

Every path of a run (``data.path``, ``output_dir`` and what lies under it) is a ``StoragePath``:
the pyarrow ``FileSystem`` that reaches it plus the path inside that filesystem. Ray Data takes
the same pair (``filesystem=``), so the driver, Ray Data tasks and plain pyarrow calls all see
one store. S3 settings: ``storage.endpoint_url`` (else ``AWS_ENDPOINT_URL``), ``storage.region``
(else ``AWS_REGION`` / ``AWS_DEFAULT_REGION``); credentials come from the usual AWS environment
variables (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``) or an
instance role, read by pyarrow itself.

Writes of small files (manifests, markers, configs) are atomic: S3 makes an object visible only
when its upload completes, and locally the text goes to a temporary file renamed into place.
Whole folders (a student, an evaluation) are published with ``publish_folder``: renamed into place
locally, uploaded with one chosen file last on S3.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pyarrow.fs as pafs

if TYPE_CHECKING:  # pydantic stays out of a Ray-free training run (raydistill.train.smoke)
    from collections.abc import Iterator

    from .config import StorageConfig

S3 = "s3://"


def is_remote(path: str | os.PathLike) -> bool:
    """True for ``s3://`` paths."""
    return str(path).startswith(S3)


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str | None:
    """The bucket's own region, asked from AWS once per process (no credentials needed)."""
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return None


def _s3_filesystem(storage: StorageConfig | None, bucket: str) -> pafs.S3FileSystem:
    endpoint = (storage.endpoint_url if storage else None) or os.environ.get("AWS_ENDPOINT_URL")
    region = (storage.region if storage else None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and not endpoint:
        region = _bucket_region(bucket)
    kwargs: dict = {"region": region or "us-east-1"}
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=url.netloc + url.path.rstrip("/"), scheme=url.scheme or "https")
    return pafs.S3FileSystem(**kwargs)


def s3_env(storage: StorageConfig | None) -> dict[str, str]:
    """The AWS variables that point other S3 clients (boto3 in Ray LLM's model downloader, inside
    an engine actor) at the S3 raydistill uses: ``storage.endpoint_url`` → ``AWS_ENDPOINT_URL``,
    ``storage.region`` → ``AWS_REGION``; only those the config sets (else the environment's own)."""
    env = {}
    if storage is not None and storage.endpoint_url:
        env["AWS_ENDPOINT_URL"] = storage.endpoint_url
    if storage is not None and storage.region:
        env["AWS_REGION"] = storage.region
    return env


@dataclass(frozen=True)
class StoragePath:
    """A file or folder on local disk or S3.

    ``uri``: as users read it (``s3://bucket/key`` or an absolute local path); ``fs``: the pyarrow
    filesystem; ``path``: the path inside ``fs`` (``bucket/key`` on S3).
    """

    uri: str
    fs: pafs.FileSystem
    path: str

    @property
    def remote(self) -> bool:
        return self.uri.startswith(S3)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __truediv__(self, name: str) -> "StoragePath":
        name = str(name).strip("/")
        return StoragePath(f"{self.uri.rstrip('/')}/{name}", self.fs, f"{self.path.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.uri

    def local(self) -> Path:
        """The local ``Path``; raises ValueError for an S3 path."""
        if self.remote:
            raise ValueError(f"{self.uri} is on S3, not a local path")
        return Path(self.path)

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        """A folder (on S3: any object lies under this prefix)."""
        return self._type() == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_text(self, text: str) -> None:
        """Write ``text`` (UTF-8) atomically: readers see the old file or the whole new one."""
        self.write_bytes(text.encode("utf-8"))

    def write_bytes(self, data: bytes) -> None:
        """Write ``data`` atomically: readers see the old file or the whole new one."""
        if self.remote:
            with self.fs.open_output_stream(self.path) as f:  # visible only once complete
                f.write(data)
            return
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        """Remove this file or folder (and everything under it); nothing happens if it is absent."""
        kind = self._type()
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def files(self, suffix: str = "") -> list["StoragePath"]:
        """Files under this folder (recursively), sorted, ending in ``suffix``; hidden files and
        names starting with ``_`` or ``.`` (markers, temporary files) are left out. [] if absent."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        base = self.path.rstrip("/")
        out = []
        for info in infos:
            if info.type != pafs.FileType.File or not info.path.endswith(suffix):
                continue
            rel = info.path[len(base):].lstrip("/")
            if any(part.startswith(("_", ".")) for part in rel.split("/")):
                continue
            out.append(self / rel)
        return sorted(out, key=lambda p: p.path)

    def glob(self) -> list["StoragePath"]:
        """Files matching this path's last component as a glob (``data/part-*.parquet``), sorted."""
        parent_uri, _, pattern = self.uri.rstrip("/").rpartition("/")
        parent = StoragePath(parent_uri, self.fs, self.path.rstrip("/").rpartition("/")[0])
        if not parent.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(parent.path, recursive=False))
        return sorted((parent / i.base_name for i in infos
                       if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.base_name, pattern)),
                      key=lambda p: p.path)


def storage_path(path: str | os.PathLike, storage: StorageConfig | None = None) -> StoragePath:
    """The ``StoragePath`` of a local path (made absolute, ``~`` expanded) or an ``s3://`` URI."""
    text = str(path)
    if is_remote(text):
        key = text[len(S3):].rstrip("/")
        if not key or key.startswith("/"):
            raise ValueError(f"{text}: an S3 path needs a bucket (s3://bucket/prefix)")
        return StoragePath(f"{S3}{key}", _s3_filesystem(storage, key.split("/", 1)[0]), key)
    local = os.path.abspath(os.path.expanduser(text))
    return StoragePath(local, pafs.LocalFileSystem(), local)


def upload_dir(local: str | os.PathLike, dest: StoragePath) -> None:
    """Copy the local folder ``local`` to ``dest`` (replaced); a local ``dest`` gets a plain copy."""
    import shutil

    dest.delete()
    if not dest.remote:
        shutil.copytree(local, dest.local())
        return
    pafs.copy_files(str(local), dest.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)


@contextlib.contextmanager
def staging_folder(dest: StoragePath) -> Iterator[Path]:
    """A new empty local folder to build what ``publish_folder`` then puts at ``dest``; removed
    with whatever is left in it on exit. For a local ``dest`` it lies beside ``dest``
    (``<name>.partial.<random>``: same filesystem, so publishing renames without a copy), and the
    ``<name>.partial.*`` folders of builds that were killed are removed first; for an ``s3://``
    ``dest`` it lies under the raydistill cache (``model_files.cache_dir() / "tmp"``)."""
    import shutil
    import tempfile

    if dest.remote:
        from .model_files import cache_dir

        parent = cache_dir() / "tmp"
    else:
        parent = dest.local().parent
        for stale in parent.glob(dest.local().name + ".partial.*"):
            shutil.rmtree(stale, ignore_errors=True)
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=dest.name + ".partial.") as tmp:
        yield Path(tmp)


def _same_filesystem(a: Path, b: Path) -> bool:
    """Whether a rename from ``a`` into ``b`` stays on one filesystem (no copy)."""
    return os.stat(a).st_dev == os.stat(b).st_dev


def publish_folder(local: str | os.PathLike, dest: StoragePath, last: str | None = None) -> None:
    """Put the finished local folder ``local`` at ``dest`` (local or ``s3://``), replacing what was
    there, so that no reader ever takes an unfinished folder for a finished one.

    - Local ``dest``: ``local`` is moved into place: renamed when it is on ``dest``'s filesystem
      (build it in ``staging_folder(dest)`` to publish without a copy), else first copied into a
      ``staging_folder(dest)`` beside ``dest`` and removed. What was at ``dest`` is removed just
      before the rename: a reader sees the old folder, none, or the whole new one. ``last`` plays
      no part (the folder appears whole).
    - ``s3://`` ``dest``: S3 has no rename, so what was there is deleted and ``local`` is uploaded,
      with the file ``last`` (a name relative to ``local``, e.g. ``report.json``; it must exist)
      uploaded after every other file: a ``dest`` without ``last`` is an upload that was cut short
      (or is still running) and must be treated as unfinished. ``local`` is left as it was (while
      the rest goes up, ``last`` waits beside it, as ``<local name>.<last>``, and is put back).
      Without ``last`` the files go up in no set order.
    """
    import shutil

    local = Path(local)
    if dest.remote:
        if last is None:
            upload_dir(local, dest)
            return
        held = local.with_name(f"{local.name}.{last.replace('/', '_')}")  # out of the folder while the rest goes up
        (local / last).rename(held)
        try:
            upload_dir(local, dest)
        finally:
            held.rename(local / last)
        (dest / last).write_bytes((local / last).read_bytes())
        return
    target = dest.local()
    target.parent.mkdir(parents=True, exist_ok=True)
    if _same_filesystem(local, target.parent):
        shutil.rmtree(target, ignore_errors=True)
        local.rename(target)
        return
    with staging_folder(dest) as tmp:
        staged = Path(tmp) / dest.name
        shutil.copytree(local, staged)
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)
    shutil.rmtree(local, ignore_errors=True)


def remote_listing(ref: str, storage: StorageConfig | None = None) -> dict[str, list[int]]:
    """Every file under the ``s3://`` folder ``ref``: relative name → [size in bytes, mtime in ns]."""
    src = storage_path(ref, storage)
    listing = {}
    for f in src.files():
        info = f.fs.get_file_info(f.path)
        listing[f.path[len(src.path):].lstrip("/")] = [info.size, info.mtime_ns]
    return listing


def local_copy(ref: str, storage: StorageConfig | dict | None = None, weights: bool = True) -> str:
    """``ref`` unchanged unless it is an ``s3://`` folder (a student or checkpoint written to S3):
    then a local copy under the raydistill cache, refreshed when the file list or sizes changed.
    Returns a path ``from_pretrained`` can read (with ``weights=False``: only the config,
    generation config and tokenizer files, ``model_files.METADATA_FILES``, and nothing else (no weights,
    no optimizer states, no subfolders): what a driver reads, at a fraction of the size).
    ``storage`` may be ``StorageConfig.model_dump()`` (what a Ray actor is given). Raises
    FileNotFoundError when nothing is there."""
    if not is_remote(ref):
        return ref
    if isinstance(storage, dict):
        from .config import StorageConfig

        storage = StorageConfig.model_validate(storage)
    import hashlib
    import json
    import shutil

    from .model_files import cache_dir, is_metadata_file

    src = storage_path(ref, storage)
    # names, sizes and modification times: a folder rewritten with files of the same sizes (a rebuilt
    # baseline student) is copied again
    listing = remote_listing(ref, storage)
    if not listing:
        raise FileNotFoundError(f"{ref}: no files there")
    if not weights:
        listing = {name: v for name, v in listing.items() if is_metadata_file(name)}
    dest = cache_dir() / "s3" / (hashlib.sha256(src.uri.encode()).hexdigest()[:16] + ("" if weights else "-config"))
    stamp = dest / ".raydistill-listing.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == listing:
        return str(dest)
    tmp = dest.with_name(dest.name + f".{uuid.uuid4().hex}.partial")
    tmp.mkdir(parents=True)  # copy_files makes only the subfolders it lists, not the destination itself
    if weights:
        pafs.copy_files(src.path, str(tmp), source_filesystem=src.fs, destination_filesystem=pafs.LocalFileSystem())
    else:
        for name in listing:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{src.path}/{name}", str(tmp / name), source_filesystem=src.fs,
                            destination_filesystem=pafs.LocalFileSystem())
    (tmp / stamp.name).write_text(json.dumps(listing))
    if stamp.is_file() and json.loads(stamp.read_text()) == listing:
        shutil.rmtree(tmp, ignore_errors=True)  # another process on this node copied the same meanwhile
        return str(dest)
    shutil.rmtree(dest, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process on this node renamed its (same) copy into place first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
