"""OpenAI's Files API on the gateway, driven by the official ``openai`` SDK: uploads streamed to
storage (a local folder, or an S3-compatible server), owned per API key, size-limited."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

BOUNDARY = "genq-test-boundary-7d1f"


def sdk(http: httpx.Client, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{str(http.base_url).rstrip('/')}/v1", api_key=api_key,
                         max_retries=0)


def multipart(parts: list[tuple[str, str | None, Iterable[bytes]]]) -> Iterator[bytes]:
    """A multipart/form-data body, generated piece by piece: (field, filename, data)."""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        yield f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        yield from data
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def post_form(http: httpx.Client, parts, headers: dict | None = None) -> httpx.Response:
    return http.post("/v1/files", content=multipart(parts),
                     headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}",
                              **(headers or {})})


def stored(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


BATCH = b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"messages": [{"role": "user", "content": f"hi {i}"}]}})
                 .encode() + b"\n" for i in range(3))


def test_files_lifecycle_with_the_official_sdk(gateway, tmp_path):
    root = tmp_path / "files"
    http = gateway(files_url=str(root))
    api = sdk(http)

    first = api.files.create(file=("requests.jsonl", BATCH), purpose="batch")
    assert first.id.startswith("file-") and first.object == "file"
    assert (first.bytes, first.filename, first.purpose, first.status) == (
        len(BATCH), "requests.jsonl", "batch", "processed")
    assert abs(first.created_at - time.time()) < 60
    binary = bytes(range(256)) * 1000 + b"\r\n--" + BOUNDARY.encode() + b"\r\n"  # boundary-like
    second = api.files.create(file=("dir/other.bin", binary), purpose="batch")
    assert second.filename == "other.bin"  # no folders
    assert sorted(stored(root)) == sorted([first.id, first.id + ".json",
                                           second.id, second.id + ".json"])

    got = api.files.retrieve(first.id)
    assert got.model_dump() == first.model_dump()
    assert api.files.content(first.id).content == BATCH
    assert api.files.content(second.id).content == binary
    raw = http.get(f"/v1/files/{first.id}/content")
    assert raw.headers["content-length"] == str(len(BATCH))

    listed = api.files.list()
    assert [f.id for f in listed.data] == [second.id, first.id]  # newest first
    assert [f.id for f in api.files.list(purpose="batch")] == [second.id, first.id]
    assert list(api.files.list(purpose="fine-tune")) == []
    page = http.get("/v1/files", params={"limit": 1}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert page["first_id"] == page["last_id"] == second.id
    rest = http.get("/v1/files", params={"limit": 1, "after": second.id}).json()
    assert [f["id"] for f in rest["data"]] == [first.id] and rest["has_more"] is False
    oldest = http.get("/v1/files", params={"order": "asc"}).json()
    assert [f["id"] for f in oldest["data"]] == [first.id, second.id]
    assert [f.id for f in api.files.list(limit=1)] == [second.id, first.id]  # SDK pages on
    bad_limit = http.get("/v1/files", params={"limit": 0})
    assert bad_limit.status_code == 400 and bad_limit.json()["error"]["param"] == "limit"

    deleted = api.files.delete(first.id)
    assert (deleted.id, deleted.deleted) == (first.id, True)
    assert stored(root) == sorted([second.id, second.id + ".json"])
    for call in (api.files.retrieve, api.files.delete, lambda i: api.files.content(i).content):
        with pytest.raises(openai.NotFoundError) as err:
            call(first.id)
        assert err.value.body["code"] == "not_found" and err.value.body["type"] == "not_found_error"
    for bad_id in ("file-nope", "../../etc/passwd", "file-0123456789abcdef.json"):
        assert http.get(f"/v1/files/{bad_id}").status_code == 404
    assert [f.id for f in api.files.list()] == [second.id]


def test_uploads_that_break_the_rules_are_refused_and_nothing_is_kept(gateway, tmp_path):
    root = tmp_path / "files"
    http = gateway(files_url=str(root))
    api = sdk(http)
    with pytest.raises(openai.BadRequestError) as err:
        api.files.create(file=("x.jsonl", BATCH), purpose="fine-tune")
    assert err.value.body["param"] == "purpose" and "batch" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        api.files.create(file=("x.jsonl", BATCH), purpose="batch_output")
    assert err.value.body["param"] == "purpose"

    # the purpose after the file (curl -F file=@x -F purpose=batch does this): accepted...
    r = post_form(http, [("file", "late.jsonl", [BATCH]), ("purpose", None, [b"batch"])])
    assert r.status_code == 200, r.text
    late = r.json()
    assert late["purpose"] == "batch" and late["bytes"] == len(BATCH)
    assert http.get(f"/v1/files/{late['id']}/content").content == BATCH
    # ...and so is a wrong one there, once the file is read: then it is removed again
    r = post_form(http, [("file", "x.jsonl", [BATCH]), ("purpose", None, [b"assistants"])])
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    r = post_form(http, [("file", "x.jsonl", [BATCH])])
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    r = post_form(http, [("purpose", None, [b"batch"])])
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = post_form(http, [("purpose", None, [b"batch"]), ("file", "a", [b"1"]), ("file", "b", [b"2"])])
    assert r.status_code == 400 and "only one" in r.json()["error"]["message"]
    truncated = b"".join(multipart([("purpose", None, [b"batch"]), ("file", "t", [BATCH])]))
    r = http.post("/v1/files", content=truncated[:-40],
                  headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert r.status_code == 400 and "closing boundary" in r.json()["error"]["message"]
    empty = api.files.create(file=("empty.jsonl", b""), purpose="batch")
    assert empty.bytes == 0 and api.files.content(empty.id).content == b""
    api.files.delete(empty.id)
    r = http.post("/v1/files", json={"file": "x", "purpose": "batch"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert stored(root) == sorted([late["id"], late["id"] + ".json"])


def test_files_belong_to_the_key_that_uploaded_them(gateway, tmp_path):
    root = tmp_path / "files"
    http = gateway(files_url=str(root), api_keys="team-a:ka,team-b:kb", admin_keys="ops:kadmin")
    a, b, admin = sdk(http, "ka"), sdk(http, "kb"), sdk(http, "kadmin")
    mine = a.files.create(file=("a.jsonl", BATCH), purpose="batch")
    theirs = b.files.create(file=("b.jsonl", b"{}\n"), purpose="batch")

    assert [f.id for f in a.files.list()] == [mine.id]
    assert [f.id for f in b.files.list()] == [theirs.id]
    assert {f.id for f in admin.files.list()} == {mine.id, theirs.id}
    assert a.files.content(mine.id).content == BATCH
    for call in (b.files.retrieve, lambda i: b.files.content(i).content, b.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(mine.id)
    after = http.get("/v1/files", params={"after": mine.id}, headers={"authorization": "Bearer kb"})
    assert after.status_code == 400  # not even a cursor over another key's file
    assert admin.files.retrieve(mine.id).id == mine.id
    with pytest.raises(openai.AuthenticationError):
        sdk(http, "wrong").files.list()
    with pytest.raises(openai.AuthenticationError):
        sdk(http, "wrong").files.create(file=("x", b"x"), purpose="batch")
    assert http.get(f"/v1/files/{mine.id}/content").status_code == 401  # no key at all
    assert a.files.delete(mine.id).deleted is True
    assert stored(root) == sorted([theirs.id, theirs.id + ".json"])


def test_an_upload_over_the_limit_gets_413_and_nothing_is_kept(gateway, tmp_path):
    root = tmp_path / "files"
    http = gateway(files_url=str(root), max_upload_bytes=1024 * 1024)
    api = sdk(http)
    with pytest.raises(openai.APIStatusError) as err:  # Content-Length says 3 MB: refused at once
        api.files.create(file=("big.jsonl", b"x" * (3 * 1024 * 1024)), purpose="batch")
    assert err.value.status_code == 413

    # chunked (no Content-Length), just over the limit: refused by the store as it arrives
    def over() -> Iterator[bytes]:
        yield from (b"y" * 65536 for _ in range(16))  # 1 MB: allowed...
        yield b"z"  # ...one byte more is not

    r = post_form(http, [("purpose", None, [b"batch"]), ("file", "over.jsonl", over())])
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    assert stored(root) == []
    exact = post_form(http, [("purpose", None, [b"batch"]),
                             ("file", "exact.jsonl", (b"y" * 65536 for _ in range(16)))])
    assert exact.status_code == 200 and exact.json()["bytes"] == 1024 * 1024


def test_a_50_mb_upload_is_streamed_through_never_held_in_memory(gateway, tmp_path):
    """The traced Python memory of the whole process (gateway and test client) stays far below
    the file's size, uploading and downloading it."""
    import tracemalloc

    root = tmp_path / "files"
    http = gateway(files_url=str(root))
    size_mb = 50
    sent = hashlib.sha256()

    def content() -> Iterator[bytes]:
        for i in range(size_mb):
            chunk = (f"{i:08d}".encode() + bytes(range(256))) * (2**20 // 264)
            chunk += b"\n" * (2**20 - len(chunk))
            sent.update(chunk)
            yield chunk

    tracemalloc.start()
    try:
        r = post_form(http, [("purpose", None, [b"batch"]), ("file", "big.jsonl", content())])
        upload_peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.reset_peak()
        received, length = hashlib.sha256(), 0
        with http.stream("GET", f"/v1/files/{r.json()['id']}/content") as down:
            assert down.status_code == 200
            for chunk in down.iter_bytes():
                received.update(chunk)
                length += len(chunk)
        download_peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text
    assert r.json()["bytes"] == length == size_mb * 2**20
    assert (root / r.json()["id"]).stat().st_size == length
    assert received.hexdigest() == sent.hexdigest()
    print(f"{size_mb} MB: traced peak upload {upload_peak:.1f} MB, download {download_peak:.1f} MB")
    assert upload_peak < 12 and download_peak < 12, (upload_peak, download_peak)


@pytest.fixture
def s3(monkeypatch):
    """A private S3-compatible server (moto) with a bucket; its fsspec storage options."""
    import boto3
    from moto.server import ThreadedMotoServer

    from worker.stack import free_port

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket="genq-files")
    yield client, {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    server.stop()


def test_files_on_an_s3_compatible_store_shared_by_two_gateways(gateway, s3):
    client, options = s3
    settings = {"files_url": "s3://genq-files/genq", "files_options": options}
    one, two = sdk(gateway(**settings)), sdk(gateway(**settings))

    def objects() -> list[str]:
        listing = client.list_objects_v2(Bucket="genq-files", Prefix="genq/")
        return sorted(o["Key"] for o in listing.get("Contents", []))

    small = one.files.create(file=("small.jsonl", BATCH), purpose="batch")
    assert objects() == [f"genq/{small.id}", f"genq/{small.id}.json"]
    body = client.get_object(Bucket="genq-files", Key=f"genq/{small.id}")["Body"].read()
    assert body == BATCH
    assert [f.id for f in two.files.list()] == [small.id]  # the other gateway sees it

    big = bytes(range(256)) * (12 * 2**20 // 256)  # over one 8 MB part: a multipart upload
    large = two.files.create(file=("large.jsonl", big), purpose="batch")
    assert large.bytes == len(big)
    assert one.files.retrieve(large.id).bytes == len(big)  # created after one's listing
    assert one.files.content(large.id).content == big
    assert [f.id for f in one.files.list()] == [large.id, small.id]

    assert two.files.delete(small.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        one.files.retrieve(small.id)
    assert [f.id for f in one.files.list()] == [large.id]
    assert objects() == [f"genq/{large.id}", f"genq/{large.id}.json"]


def test_files_options_are_read_from_the_environment_and_masked(monkeypatch):
    from worker.ops.settings import Settings

    monkeypatch.setenv("GENQ_FILES_URL", "s3://bucket/prefix")
    monkeypatch.setenv("GENQ_FILES_OPTIONS", json.dumps({
        "endpoint_url": "http://user:pw@minio:9000", "key": "AKIA123", "secret": "s3cr3t",
        "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": "tok"}}))
    settings = Settings()
    assert settings.files_options["secret"] == "s3cr3t"
    shown = settings.masked()
    assert shown["files_url"] == "s3://bucket/prefix"
    assert shown["files_options"] == {
        "endpoint_url": "http://user:***@minio:9000", "key": "***", "secret": "***",
        "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": "***"}}
    assert "s3cr3t" not in json.dumps(shown) and "AKIA123" not in json.dumps(shown)
    monkeypatch.delenv("GENQ_FILES_OPTIONS")
    assert Settings().masked()["files_options"] == {}


def test_the_store_limits_uploads_but_not_the_files_the_gateway_writes(tmp_path):
    from worker.compat.storage import FileStore, FileTooLarge
    from worker.errors import NotFound

    store = FileStore(str(tmp_path / "files"), max_bytes=10)
    with pytest.raises(FileTooLarge):
        store.create([b"x" * 6, b"y" * 6], "in.jsonl", "batch", owner="a")
    assert stored(tmp_path / "files") == []
    out = store.create(iter([b"z" * 6] * 3), "out.jsonl", "batch_output", owner="a")
    assert out["bytes"] == 18 and b"".join(store.read_chunks(out["id"], "a")) == b"z" * 18
    with pytest.raises(FileTooLarge):
        store.create([b"z" * 6] * 3, "out.jsonl", "batch_output", owner="a", max_bytes=12)
    with pytest.raises(NotFound):
        store.get(out["id"], owner="b")
    assert store.get(out["id"], owner="b", admin=True)["id"] == out["id"]
    assert [f["id"] for f in store.list(owner="a", purpose="batch_output")] == [out["id"]]
    assert store.list(owner="a", purpose="batch") == [] and store.list(owner="b") == []
