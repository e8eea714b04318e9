"""OpenAI's Files API: ``POST/GET /v1/files``, ``GET/DELETE /v1/files/{id}``,
``GET /v1/files/{id}/content``, over the gateway's ``FileStore``.

An upload is parsed as it arrives (python-multipart's streaming parser over the request body)
and its file part is written to storage a megabyte at a time: it is never held in memory or
spooled whole, whatever its size (up to ``GENQ_MAX_UPLOAD_BYTES``). Files belong to the API key
that uploaded them; another key's answer 404 (admin keys see every file).
"""

from __future__ import annotations

import posixpath
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

from anyio import from_thread
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from worker.compat.shapes import openai_error
from worker.compat.storage import CHUNK, FileStore, FileTooLarge
from worker.errors import InvalidRequest

PURPOSES = ("batch",)  # what a user uploads here (batch outputs are written by the gateway)
MAX_FIELD_BYTES = 64 * 1024  # a form field other than the file (purpose...)
MAX_FIELDS = 32
MAX_LIST = 10_000


class BadUpload(InvalidRequest):
    """A malformed upload: 400 with OpenAI's error object, ``param`` naming the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class MultipartStream:
    """A ``multipart/form-data`` body parsed as it arrives: each part's headers, then its data
    in pieces. Nothing is buffered beyond the network chunk being parsed."""

    def __init__(self, stream: AsyncIterator[bytes], boundary: bytes):
        self._stream = stream
        self._events: deque[tuple[str, Any]] = deque()
        self._name = self._value = b""
        self._headers: dict[bytes, bytes] = {}
        self._exhausted = False
        self._complete = False  # the closing boundary was seen
        self._part_done = True
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": lambda: self._events.append(("end", None)),
            "on_end": self._on_end,
        })

    # parser callbacks: they only queue events
    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._name.lower()] = self._value
        self._name = self._value = b""

    def _on_headers_finished(self) -> None:
        self._events.append(("part", self._headers))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._events.append(("data", data[start:end]))

    def _on_end(self) -> None:
        self._complete = True

    async def _event(self) -> tuple[str, Any] | None:
        """The next parser event, reading more of the body as needed; None at its end."""
        while not self._events:
            if self._exhausted:
                return None
            chunk = await anext(self._stream, None)
            if chunk is None:
                self._exhausted = True
                if not self._complete:
                    raise BadUpload("the multipart body ended before its closing boundary", "file")
                continue
            try:
                self._parser.write(chunk)
            except FormParserError as exc:
                raise BadUpload(f"not valid multipart/form-data: {exc}", "file") from None
        return self._events.popleft()

    async def next_part(self) -> tuple[str, str | None] | None:
        """Skip to the next part: its field name and filename (None for a plain field);
        None when there are no more parts."""
        while (event := await self._event()) is not None:
            if event[0] == "part":
                self._part_done = False
                return _disposition(event[1])
        return None

    async def read(self, size: int = CHUNK) -> bytes:
        """About ``size`` more bytes of the current part (more if one piece is bigger);
        b"" once it is all read."""
        out = bytearray()
        while len(out) < size and not self._part_done:
            event = await self._event()
            if event is None or event[0] == "end":
                self._part_done = True
            elif event[0] == "data":
                out += event[1]
        return bytes(out)

    async def field(self, name: str) -> str:
        """The whole value of the current part, a small text field."""
        value = await self.read(MAX_FIELD_BYTES + 1)
        if len(value) > MAX_FIELD_BYTES:
            raise BadUpload(f"form field {name!r} is longer than {MAX_FIELD_BYTES} bytes", name)
        return value.decode("utf-8", errors="replace")

    async def rest(self, fields: dict[str, str]) -> None:
        """Read the parts after the file into ``fields`` (a second file is refused)."""
        while (part := await self.next_part()) is not None:
            name, filename = part
            if name == "file":
                raise BadUpload("only one `file` may be uploaded per request", "file")
            fields[name] = await self.field(name)
            if len(fields) > MAX_FIELDS:
                raise BadUpload(f"more than {MAX_FIELDS} form fields", None)

    async def drain(self) -> None:
        """Read the rest of the body unparsed (so an early error answer reaches the client)."""
        async for _ in self._stream:
            pass


def _disposition(headers: dict[bytes, bytes]) -> tuple[str, str | None]:
    kind, options = parse_options_header(headers.get(b"content-disposition", b""))
    if kind != b"form-data" or b"name" not in options:
        raise BadUpload("a multipart part has no Content-Disposition form-data name", None)
    name = _text(options[b"name"])
    filename = options.get(b"filename")
    return name, None if filename is None else _text(filename)


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _clean_filename(filename: str | None) -> str:
    """The file's own name: no folders (some clients send the path), at most 255 characters."""
    name = posixpath.basename((filename or "").replace("\\", "/")).strip()
    return (name or "upload")[:255]


def _check_purpose(purpose: str | None) -> None:
    if purpose is None:
        raise BadUpload("`purpose` is required: upload with purpose=batch", "purpose")
    if purpose not in PURPOSES:
        raise BadUpload(f"purpose {purpose[:100]!r} is not supported: files uploaded here must "
                        f"have purpose {' or '.join(map(repr, PURPOSES))}", "purpose")


def _error(status: int, message: str, code: str, param: str | None) -> JSONResponse:
    return openai_error(status, message, code, param=param)


def router(client, settings, files: FileStore) -> APIRouter:
    """The routes of this part of the OpenAI surface."""
    api = APIRouter(tags=["files"])

    @api.post("/v1/files", openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file", "purpose"],
            "properties": {"file": {"type": "string", "format": "binary"},
                           "purpose": {"type": "string", "enum": list(PURPOSES)}}}}}}})
    async def create_file(request: Request) -> Any:
        """Upload a file (multipart ``file`` and ``purpose=batch``), streamed to storage; its
        OpenAI ``file`` object. Over ``GENQ_MAX_UPLOAD_BYTES``: 413, and nothing is kept."""
        return await upload(request, files)

    @api.get("/v1/files")
    def list_files(request: Request, purpose: str | None = None,
                   limit: int = Query(MAX_LIST, ge=1, le=MAX_LIST), after: str | None = None,
                   order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
        """The caller's files, newest first (``order=asc``: oldest first), ``limit`` at a time
        after the file id ``after``; optionally only those of one ``purpose``."""
        view = request.state.client
        items = files.list(view.owner, view.admin, purpose)
        if order == "asc":
            items.reverse()
        return page_of(items, limit, after)

    @api.get("/v1/files/{file_id}")
    def retrieve_file(file_id: str, request: Request) -> dict[str, Any]:
        """One file object."""
        view = request.state.client
        return files.get(file_id, view.owner, view.admin)

    @api.get("/v1/files/{file_id}/content", response_class=StreamingResponse,
             responses={200: {"content": {"application/octet-stream": {}}}})
    def file_content(file_id: str, request: Request) -> StreamingResponse:
        """The file's bytes, streamed from storage."""
        view = request.state.client
        info = files.get(file_id, view.owner, view.admin)
        f = files.open(file_id, view.owner, view.admin)  # 404 before the answer starts

        def body() -> Iterator[bytes]:
            with f:
                while chunk := f.read(CHUNK):
                    yield chunk

        return StreamingResponse(body(), media_type="application/octet-stream",
                                 headers={"content-length": str(info["bytes"])})

    @api.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, request: Request) -> dict[str, Any]:
        """Delete a file (its bytes and its object)."""
        view = request.state.client
        files.delete(file_id, view.owner, view.admin)
        return {"id": file_id, "object": "file", "deleted": True}

    return api


async def upload(request: Request, files: FileStore) -> Any:
    """``POST /v1/files``: the form's fields before ``file`` read and checked, then the file
    streamed to storage (the fields after it read at its end)."""
    view = request.state.client
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        return _error(400, "upload the file as multipart/form-data with the fields `file` "
                      "and `purpose`", "invalid_request", "file")
    form = MultipartStream(request.stream(), options[b"boundary"])
    fields: dict[str, str] = {}
    try:
        while (part := await form.next_part()) is not None:
            name, filename = part
            if name == "file":
                break
            fields[name] = await form.field(name)
            if len(fields) > MAX_FIELDS:
                raise BadUpload(f"more than {MAX_FIELDS} form fields", None)
        else:
            raise BadUpload("`file` is required", "file")
        if "purpose" in fields:  # refuse before storing anything
            _check_purpose(fields["purpose"])
    except BadUpload as exc:
        await form.drain()
        return _error(400, exc.message, "invalid_request", exc.param)

    def chunks() -> Iterator[bytes]:  # in a worker thread: storage writes block
        while piece := from_thread.run(form.read):
            yield piece
        from_thread.run(form.rest, fields)  # ``purpose`` may come after the file
        _check_purpose(fields.get("purpose"))  # raising here: nothing is kept

    try:
        return await run_in_threadpool(files.create, chunks(), _clean_filename(filename),
                                       "batch", view.owner)
    except FileTooLarge as exc:
        await form.drain()
        return _error(413, exc.message, "file_too_large", "file")
    except BadUpload as exc:
        await form.drain()
        return _error(400, exc.message, "invalid_request", exc.param)


def page_of(items: list[dict[str, Any]], limit: int, after: str | None) -> Any:
    """An OpenAI list page: ``limit`` items after the one with id ``after``."""
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            return _error(400, f"no file {after[:100]!r} to list after", "invalid_request",
                          "after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "has_more": len(items) > limit,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}

