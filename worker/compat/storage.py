"""Uploaded and generated files, stored through fsspec: a local folder by default, any fsspec
URL (``s3://bucket/prefix``...) when several gateways share them (``GENQ_FILES_URL``).

Each file is two objects under the root: ``<id>`` (the bytes, streamed in and out, never held
whole) and ``<id>.json`` (its OpenAI ``file`` object plus its owner), written after the bytes:
a file is listed only once complete. Ids are ``file-<hex>``, in creation order.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import fsspec

from worker.errors import InvalidRequest, NotFound

CHUNK = 1024 * 1024
WRITE_BLOCK = 8 * 1024 * 1024
GENERATED = ("batch_output",)  # purposes of files the gateway writes: no upload limit
ID = re.compile(r"file-[0-9a-f]{8,64}")


def new_id() -> str:
    """``file-`` + 32 hex digits, the first 16 the creation time in nanoseconds: ids sort in
    creation order (newest first within a second too)."""
    return f"file-{time.time_ns():016x}{uuid.uuid4().hex[:16]}"


class FileTooLarge(InvalidRequest):
    """An upload over ``GENQ_MAX_UPLOAD_BYTES``; nothing is kept."""


class FileStore:
    """Create, list, read and delete files under one fsspec root URL."""

    def __init__(self, url: str, max_bytes: int, **storage_options: Any):
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.max_bytes = max_bytes
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, file_id: str, meta: bool = False) -> str:
        if not ID.fullmatch(file_id):
            raise NotFound(f"no file {file_id[:100]!r}")
        return f"{self.root}/{file_id}{'.json' if meta else ''}"

    def create(self, chunks: Iterable[bytes], filename: str, purpose: str,
               owner: str | None = None, max_bytes: int | None | str = "default") -> dict[str, Any]:
        """Stream ``chunks`` into a new file; its OpenAI file object. ``FileTooLarge`` past
        ``max_bytes`` (by default the store's upload limit, none for the files the gateway
        writes itself: purpose ``batch_output``); whatever ``chunks`` raises propagates. Either
        way nothing is kept (a file is only listed once its ``.json`` is written, after it)."""
        if max_bytes == "default":
            max_bytes = None if purpose in GENERATED else self.max_bytes
        file_id = new_id()
        size = 0
        path = self._path(file_id)
        try:
            # block_size: what a remote store buffers per part (S3's minimum is 5 MB)
            with self.fs.open(path, "wb", block_size=WRITE_BLOCK) as out:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise FileTooLarge(f"file larger than {max_bytes} bytes "
                                           "(GENQ_MAX_UPLOAD_BYTES)")
                    out.write(chunk)
        except BaseException:
            self._remove(path)
            raise
        info = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed",
                "expires_at": None, "status_details": None}
        try:
            self.fs.pipe_file(self._path(file_id, meta=True),
                              json.dumps({**info, "owner": owner}).encode())
        except BaseException:
            self._remove(path)
            raise
        return info

    def _remove(self, path: str) -> None:
        """Remove ``path`` if it is there (cleanup: never raises over the original error)."""
        try:
            if self.fs.exists(path):
                self.fs.rm(path)
        except Exception:  # best effort: an orphan without its .json is never listed
            pass

    def get(self, file_id: str, owner: str | None = None, admin: bool = False) -> dict[str, Any]:
        """The file object; ``NotFound`` if unknown or another owner's (``owner`` None: any)."""
        try:
            info = json.loads(self.fs.cat_file(self._path(file_id, meta=True)))
        except FileNotFoundError:
            raise NotFound(f"no file {file_id!r}") from None
        return self._visible(info, owner, admin, file_id)

    @staticmethod
    def _visible(info: dict[str, Any], owner: str | None, admin: bool,
                 file_id: str) -> dict[str, Any]:
        if owner is not None and not admin and info.get("owner") != owner:
            raise NotFound(f"no file {file_id!r}")
        return {k: v for k, v in info.items() if k != "owner"}

    def open(self, file_id: str, owner: str | None = None, admin: bool = False) -> BinaryIO:
        """The file's bytes as a binary file object (after the same checks as ``get``)."""
        self.get(file_id, owner, admin)
        path = self._path(file_id)
        self.fs.invalidate_cache(path)  # another gateway may have written it: no stale listing
        try:
            return self.fs.open(path, "rb")
        except FileNotFoundError:  # deleted since
            raise NotFound(f"no file {file_id!r}") from None

    def read_chunks(self, file_id: str, owner: str | None = None,
                    admin: bool = False) -> Iterator[bytes]:
        """The file's bytes, ``CHUNK`` at a time."""
        with self.open(file_id, owner, admin) as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def list(self, owner: str | None = None, admin: bool = False,
             purpose: str | None = None) -> list[dict[str, Any]]:
        """Visible file objects, newest first. Always listed afresh: other gateways may share
        the store, so no directory listing is kept cached (s3fs would)."""
        try:
            paths = self.fs.glob(f"{self.root}/file-*.json")
            # one call: remote stores fetch them concurrently; files deleted meanwhile are skipped
            metas = self.fs.cat(paths, on_error="omit") if paths else {}
        finally:
            self.fs.invalidate_cache(self.root)
        out = []
        for path, raw in metas.items():
            file_id = path.rsplit("/", 1)[-1][:-5]
            if not ID.fullmatch(file_id):
                continue
            try:
                info = self._visible(json.loads(raw), owner, admin, file_id)
            except (NotFound, ValueError):
                continue
            if purpose is None or info["purpose"] == purpose:
                out.append(info)
        return sorted(out, key=lambda i: (i["created_at"], i["id"]), reverse=True)

    def delete(self, file_id: str, owner: str | None = None, admin: bool = False) -> None:
        """Remove the file (``NotFound`` as ``get``)."""
        self.get(file_id, owner, admin)
        try:
            self.fs.rm_file(self._path(file_id, meta=True))  # unlisted first, then the bytes
        except FileNotFoundError:  # deleted meanwhile
            raise NotFound(f"no file {file_id!r}") from None
        self._remove(self._path(file_id))
