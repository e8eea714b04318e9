"""How fast a big input is validated and queued, and the gateway's memory meanwhile.

    python bench/submit_speed.py [--lines 10000] [--json out.json]

Starts its own ``redis-server`` (no worker: nothing is generated), publishes the demo model's
tokenizer as a worker would (so every line's prompt is counted, as in service), then times,
in this process:

- ``POST /v1/batches`` of an N-line OpenAI Batch file (uploaded first through ``/v1/files``):
  from the POST until the batch leaves ``validating`` (every line checked and queued), with
  ``max_tokens`` on every line (``batches_s``) and on none (``batches_fit_s``: each line then
  writes what fits the context, which needs its prompt's length);
- ``POST /v1/jobs`` of the same requests as plain JSONL: the POST until it answers;
- ``GenerationClient.submit_many`` of the same requests as dicts.

A 20-line batch runs first, untimed (the gateway loads the tokenizer once). Peak RSS
(``ru_maxrss``) is reported after each part. Uses only the public HTTP and
client API, so the same script measures any revision (``PYTHONPATH=<checkout>``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def publish_tokenizer(url: str) -> None:
    """The demo tokenizer in Redis, as a worker publishes it at start (in a child process, so
    this one's memory is the gateway's)."""
    code = """if True:
        import os, sys
        from pathlib import Path
        from types import SimpleNamespace
        import redis
        from transformers import AutoTokenizer
        from worker.engine.demo import demo_model_dir
        from worker.tokencount import publish
        cache = Path(os.environ.get("GENQ_CACHE_DIR", Path.home() / ".cache" / "genqueue"))
        tok = AutoTokenizer.from_pretrained(demo_model_dir(cache))
        engine = SimpleNamespace(tokenizer=tok, model_name="demo", context_length=8192,
                                 max_prompt_tokens=None)
        publish(redis.Redis.from_url(sys.argv[1]), engine, 3600)
    """
    subprocess.run([sys.executable, "-c", code, url], check=True)


def lines(n: int, max_tokens: bool = True) -> list[dict]:
    """Chat lines; without ``max_tokens`` each writes what fits the context (OpenAI's default),
    which needs the prompt's length."""
    limit = {"max_tokens": 16} if max_tokens else {}
    return [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "demo", **limit, "temperature": 0,
                      "messages": [{"role": "user", "content": f"Write one line about the number {i}."}]}}
            for i in range(n)]


def plain(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Write one line about the number {i}."}],
             "max_new_tokens": 16} for i in range(n)]


def flush_queues(url: str) -> None:
    """Empty the broker between parts (no worker runs them), keeping the tokenizer."""
    import redis

    r = redis.Redis.from_url(url)
    keep = {b"genq:tokenizer", b"genq:tokenizer:hash"}
    for key in r.scan_iter(count=1000):
        if key not in keep:
            r.delete(key)


def time_batches(http, n: int, max_tokens: bool = True) -> float:
    body = "".join(json.dumps(x) + "\n" for x in lines(n, max_tokens)).encode()
    f = http.post("/v1/files", files={"file": ("in.jsonl", body)}, data={"purpose": "batch"})
    f.raise_for_status()
    start = time.perf_counter()
    b = http.post("/v1/batches", json={"input_file_id": f.json()["id"],
                                       "endpoint": "/v1/chat/completions",
                                       "completion_window": "24h"})
    b.raise_for_status()
    batch = b.json()
    while batch["status"] == "validating":
        time.sleep(0.02)
        batch = http.get(f"/v1/batches/{batch['id']}").json()
    took = time.perf_counter() - start
    assert batch["status"] == "in_progress", batch
    assert batch["request_counts"]["total"] == n, batch
    return took


def time_jobs(http, n: int) -> float:
    body = "".join(json.dumps(x) + "\n" for x in plain(n)).encode()
    start = time.perf_counter()
    r = http.post("/v1/jobs", content=body, headers={"content-type": "application/jsonl"})
    took = time.perf_counter() - start
    r.raise_for_status()
    assert r.json()["counts"]["total"] == n, r.json()
    return took


def time_submit_many(url: str, n: int) -> float:
    from worker.client import GenerationClient

    client = GenerationClient(url)
    requests = plain(n)
    start = time.perf_counter()
    job = client.submit_many(requests)
    took = time.perf_counter() - start
    assert client.job(job)["counts"]["total"] == n
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    port, data = free_port(), Path(tempfile.mkdtemp(prefix="genq-submit-"))
    redis_proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "",
                                   "--appendonly", "no", "--dir", str(data)],
                                  stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    os.environ.update(GENQ_BROKER_URL=url, GENQ_DATA_DIR=str(data), GENQ_MAX_PENDING="1000000")
    try:
        time.sleep(0.3)
        publish_tokenizer(url)
        from fastapi.testclient import TestClient

        from worker.api import create_app

        out: dict[str, float] = {"lines": args.lines, "rss_start_mb": round(rss_mb(), 1)}
        with TestClient(create_app()) as http:
            time_batches(http, 20)  # warm up: the tokenizer loaded, scripts registered
            flush_queues(url)
            out["batches_s"] = round(time_batches(http, args.lines), 2)
            out["rss_after_batches_mb"] = round(rss_mb(), 1)
            flush_queues(url)
            out["batches_fit_s"] = round(time_batches(http, args.lines, max_tokens=False), 2)
            flush_queues(url)
            out["jobs_s"] = round(time_jobs(http, args.lines), 2)
            out["rss_after_jobs_mb"] = round(rss_mb(), 1)
            flush_queues(url)
        out["submit_many_s"] = round(time_submit_many(url, args.lines), 2)
        out["rss_end_mb"] = round(rss_mb(), 1)
        print(json.dumps(out))
        if args.json:
            args.json.write_text(json.dumps(out, indent=1) + "\n")
    finally:
        redis_proc.terminate()
        redis_proc.wait()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
