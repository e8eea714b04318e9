"""The HTTP gateway under uvicorn on a free port, against a real Redis and a real worker."""

from __future__ import annotations

import json
import time

import httpx
import hypothesis
import pytest
import schemathesis

from worker.ops.settings import Settings

pytestmark = pytest.mark.slow


def poll(http: httpx.Client, path: str, **kw) -> dict:
    deadline = time.monotonic() + 120
    while True:
        body = http.get(path, **kw).json()
        if body["status"] in ("succeeded", "failed", "cancelled", "expired", "completed"):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_generation_lifecycle_and_errors(gateway, start_worker):
    http = gateway()
    assert http.get("/readyz").status_code == 503  # no worker yet
    start_worker()
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"][0]["name"] == "w1@test"
    r = http.post("/v1/generations", json={"prompt": "Hello", "max_new_tokens": 8,
                                           "custom_id": "c1", "metadata": {"k": [1, 2]}})
    assert r.status_code == 202 and r.json()["status"] == "queued"
    result = poll(http, f"/v1/generations/{r.json()['id']}")
    assert result["status"] == "succeeded" and result["custom_id"] == "c1"
    assert result["metadata"] == {"k": [1, 2]} and result["usage"]["completion_tokens"] >= 1
    assert isinstance(result["batch"]["size"], int)  # 1, not 1.0
    assert http.delete(f"/v1/generations/{r.json()['id']}").json()["cancelled"] is False

    bad = http.post("/v1/generations", json={"prompt": "x", "temperature": -1, "oops": 1})
    assert bad.status_code == 422
    locs = {tuple(e["loc"]) for e in bad.json()["detail"]}
    assert ("body", "temperature") in locs and ("body", "oops") in locs
    assert http.get("/v1/generations/nope").status_code == 404
    assert http.delete("/v1/generations/nope").status_code == 404
    assert http.get("/v1/jobs/nope").status_code == 404
    big = http.post("/v1/generations", content=b"{" + b" " * (3 * 1024 * 1024) + b"}",
                    headers={"content-type": "application/json"})
    assert big.status_code == 413
    metrics = http.get("/metrics").text
    assert 'genq_queue_depth{queue="genq.interactive"}' in metrics
    assert "genq_workers_alive 1.0" in metrics


def test_openai_batch_upload_streams_results_in_order(gateway, start_worker):
    http = gateway()
    start_worker()
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": f"Count to {i}"}],
                                  "max_tokens": 6}}) for i in range(12)]
    lines.insert(5, json.dumps({"prompt": "plain request line", "max_new_tokens": 4,
                                "custom_id": "plain"}))
    r = http.post("/v1/jobs", content="\n".join(lines).encode(),
                  headers={"content-type": "application/jsonl"})
    assert r.status_code == 202, r.text
    batch = r.json()
    assert batch["counts"]["total"] == 13
    done = poll(http, f"/v1/jobs/{batch['id']}")
    assert done["counts"]["succeeded"] == 13
    out = [json.loads(x) for x in http.get(f"/v1/jobs/{batch['id']}/results").text.splitlines()]
    assert [o["custom_id"] for o in out] == [json.loads(x)["custom_id"] for x in lines]
    before = http.get("/demand").json()
    bad = http.post("/v1/jobs", content=b'{"prompt": "ok"}\nnot json\n{"prompt": ""}\n\n'
                    b'{"prompt": "long", "max_new_tokens": 99999}\n{"prompt": "fine"}',
                    headers={"content-type": "application/jsonl"})
    assert bad.status_code == 422  # every bad line, by its line in the file; nothing queued
    detail = bad.json()["detail"][0]["msg"]
    assert "line 2: not JSON" in detail and "line 3" in detail
    assert "line 5: max_new_tokens" in detail and "line 6" not in detail
    assert http.get("/demand").json() == before
    as_list = http.post("/v1/jobs", json=[{"prompt": "a"}, {"prompt": "b"}])
    assert as_list.status_code == 202 and as_list.json()["counts"]["total"] == 2
    assert http.delete(f"/v1/jobs/{as_list.json()['id']}").status_code == 200


def test_api_keys(gateway):
    http = gateway(api_keys="k1,k2")
    body = {"prompt": "hi", "max_new_tokens": 2}
    assert http.post("/v1/generations", json=body).status_code == 401
    assert http.post("/v1/generations", json=body,
                     headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = http.post("/v1/generations", json=body, headers={"Authorization": "Bearer k2"})
    assert ok.status_code == 202
    assert http.get(f"/v1/generations/{ok.json()['id']}").status_code == 401
    assert http.get(f"/v1/generations/{ok.json()['id']}",
                    headers={"Authorization": "Bearer k2"}).status_code == 200
    assert http.get(f"/v1/generations/{ok.json()['id']}",  # another key's: not revealed
                    headers={"Authorization": "Bearer k1"}).status_code == 404
    assert http.get("/healthz").status_code == 200
    assert "k1" not in http.get("/openapi.json").text


def test_queue_full_is_429_with_retry_after(gateway):
    http = gateway(max_pending=3)
    for _ in range(3):
        assert http.post("/v1/generations", json={"prompt": "x"}).status_code == 202
    full = http.post("/v1/generations", json={"prompt": "x"})
    assert full.status_code == 429 and int(full.headers["Retry-After"]) > 0
    assert http.post("/v1/jobs", json=[{"prompt": "x"}]).status_code == 429


def test_openapi_fuzzing_finds_no_server_error(redis_url, tmp_path):
    """Every route fuzzed from the schema: no 5xx, and OpenAI's error object on its routes."""
    from worker.api import create_app, is_openai_route

    app = create_app(Settings(broker_url=redis_url, max_pending=10_000, files_url=str(tmp_path)))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    tried: list[str] = []
    def fuzz(operation) -> None:
        label = operation.label

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=25, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def check(case):
            response = case.call()
            tried.append(label)
            not_ready = label == "GET /readyz" and response.status_code == 503
            assert response.status_code < 500 or not_ready, (label, response.text[:300])
            if response.status_code >= 400 and is_openai_route(operation.path):
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()

    for result in schema.get_all_operations():
        fuzz(result.ok())
    assert len(set(tried)) >= 10 and len(tried) >= 100
    files = {label for label in tried if " /v1/files" in label}
    assert len(files) == 5 and any(label.startswith("POST") for label in files), files
    print(f"schemathesis: {len(tried)} generated requests over {len(set(tried))} operations")


def test_idempotency_key_over_http(gateway):
    http = gateway(api_keys="tenant-a,tenant-b")
    a = {"Authorization": "Bearer tenant-a"}
    body = {"prompt": "hi", "max_new_tokens": 2, "idempotency_key": "order-42"}
    first = http.post("/v1/generations", json=body, headers=a)
    again = http.post("/v1/generations", json=body, headers=a)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    clash = http.post("/v1/generations", json={**body, "prompt": "other"}, headers=a)
    assert clash.status_code == 409
    other_tenant = http.post("/v1/generations", json=body, headers={"Authorization": "Bearer tenant-b"})
    assert other_tenant.json()["id"] != first.json()["id"]


def test_10000_line_upload_is_never_held_in_memory_whole(gateway, redis_url):
    """A 30 MB JSONL upload goes through a spool file and is queued 1,000 lines at a time:
    the gateway's traced Python memory stays well under the upload's size."""
    import tracemalloc

    from worker.client import GenerationClient

    http = gateway(max_pending=20_000)
    filler = "x" * 3000

    def body():
        for i in range(10_000):
            yield (json.dumps({"custom_id": f"line-{i}", "prompt": f"{i} {filler}",
                               "max_new_tokens": 1}) + "\n").encode()

    upload_mb = 10_000 * len(next(body())) / 2**20
    tracemalloc.start()
    try:
        r = http.post("/v1/jobs", content=body(), headers={"content-type": "application/jsonl"})
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert r.status_code == 202, r.text[:500]
    assert r.json()["counts"] == {"total": 10_000, "queued": 10_000, "running": 0,
                                  "succeeded": 0, "failed": 0, "cancelled": 0, "expired": 0}
    results = GenerationClient(redis_url).job_results(r.json()["id"])
    assert [res["custom_id"] for res in results] == [f"line-{i}" for i in range(10_000)]
    print(f"upload {upload_mb:.1f} MB, gateway traced peak {peak_mb:.1f} MB")
    assert peak_mb < upload_mb / 2, (peak_mb, upload_mb)


def test_paths_no_route_matches_answer_in_the_shape_of_their_surface(gateway):
    """The router's own 404/405 (found by the schema fuzz: ``/v1/models/%0A0``) is OpenAI's
    error object on the OpenAI surface and FastAPI's ``detail`` elsewhere."""
    http = gateway()
    for method, path, status in (("GET", "/v1/models/%0A0", 404), ("GET", "/v1/files/a/b/c", 404),
                                 ("DELETE", "/v1/models", 405)):
        response = http.request(method, path)
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    native = http.get("/v1/generations/a/b")
    assert native.status_code == 404 and native.json() == {
        "detail": [{"loc": [], "msg": "Not Found", "type": "not_found"}], "code": "not_found"}
