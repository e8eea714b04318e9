"""The first hour (issue 26): no silences (what `genq run` / `genq up` wait for, a moving
rate), broker clarity, readable logs, a model that cannot load in two lines, one shape for
the gateway's errors."""

from __future__ import annotations

import http.server
import importlib.util
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT
from worker.stack import free_port

pytestmark = pytest.mark.process

PW = "pw-never-shown-4817"


def genq(*args: str, env: dict | None = None, timeout: float = 300,
         drop=("GENQ_BROKER_URL",)) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True,
                          text=True, env={**base, **(env or {})}, timeout=timeout, cwd=ROOT)


# -- the rate ------------------------------------------------------------------------------


def test_moving_rate_ignores_what_finished_before_and_reads_slow_runs():
    from worker.cli.progress import MovingRate

    rate = MovingRate(window_s=10)
    assert rate.fields(174, 200, now=0.0) == {"rate": "-", "eta": "-"}  # resumed: 174 done
    assert rate.fields(175, 200, now=2.0)["rate"] == "30.0/min"  # 1 in 2 s, not 87/s
    slow = MovingRate(window_s=10)
    for t in range(0, 60, 5):  # one line every 20 s: a slow run never reads 0.0
        out = slow.fields(t // 20, 64, now=float(t))
    assert 1.5 <= float(out["rate"].removesuffix("/min")) <= 4, out  # 3/min, never 0.0
    assert out["eta"].startswith(("0:", "1:"))
    fast = MovingRate(window_s=10)
    for t in range(40):  # 10/s for 20 s, then 2/s: the window follows within 10 s
        fast.add(t * 5 if t < 20 else 100 + (t - 20), now=t / 2)
    assert fast.fields(120, 200, now=20.0)["rate"] == "2.0/s"


# -- logs ----------------------------------------------------------------------------------


def test_logs_are_console_lines_on_a_terminal_and_json_elsewhere(monkeypatch):
    from worker.ops import logging as ops_logging

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for stream, env, expected in ((Tty(), None, "console"), (io.StringIO(), None, "json"),
                                  (Tty(), "json", "json"), (io.StringIO(), "console", "console")):
        monkeypatch.setattr(ops_logging, "_stderr", lambda s=stream: s)
        if env:
            monkeypatch.setenv("GENQ_LOG_FORMAT", env)
        else:
            monkeypatch.delenv("GENQ_LOG_FORMAT", raising=False)
        assert ops_logging.log_format() == expected
        ops_logging.configure_logging("INFO")
        logging.getLogger("celery.redirected").warning("Loading shards:  40%|####  | 2/5\r")
        logging.getLogger("some.lib").warning("plain %s", "line", extra={})
        import structlog

        structlog.get_logger("t").info("worker_ready", url=f"redis://:{PW}@h:1/0")
        out = stream.getvalue()
        assert "Loading shards" not in out and PW not in out, out
        lines = [x for x in out.splitlines() if x.strip()]
        assert len(lines) == 2, out
        if expected == "json":
            assert all(json.loads(x) for x in lines)
        else:
            assert "worker_ready" in lines[1] and not lines[1].startswith("{")
    monkeypatch.setenv("GENQ_LOG_FORMAT", "json")
    ops_logging.configure_logging("INFO")


def test_a_worker_log_is_json_lines_from_start_to_shutdown(start_worker, tiny_model_dir):
    """A worker's log (not a terminal) started and stopped with SIGTERM: every line is a JSON
    object, Celery's shutdown note included; no banner, no blank line."""
    worker = start_worker("w1@test", GENQ_MODEL=str(tiny_model_dir), GENQ_SELF_CHECK="off")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    lines = (start_worker.log_dir / "w1@test.log").read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line, none blank
    assert {"worker_ready", "worker: Warm shutdown (MainProcess)"} <= {e["event"] for e in events}


@pytest.mark.model
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_genq_generate_on_vllm_prints_only_its_own_lines(tmp_path, cache_dir):
    """vLLM's warnings (Triton, libtcmalloc, its settings) and torch's C++ NUMA note stay out
    of a command's stderr: what loads, when it is ready, the progress."""
    jobs = tmp_path / "in.jsonl"
    jobs.write_text('{"prompt": "hi", "max_new_tokens": 2}\n')
    out = genq("generate", str(jobs), env={"GENQ_BACKEND": "vllm",
                                           "GENQ_CACHE_DIR": str(cache_dir)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["status"] == "succeeded", out.stdout
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("loading model") and lines[1].startswith("ready in"), out.stderr
    assert all(line.startswith("generating") for line in lines[2:]), out.stderr


# -- broker clarity ------------------------------------------------------------------------


def test_a_broker_url_that_does_not_answer_is_refused_with_the_url_and_the_fix(tmp_path):
    url = f"redis://:{PW}@127.0.0.1:{free_port()}/0"
    jobs = tmp_path / "in.jsonl"
    jobs.write_text('{"prompt": "hi", "max_new_tokens": 2}\n')
    env = {"GENQ_BROKER_URL": url, "GENQ_DATA_DIR": str(tmp_path / "data")}
    for args in (("run", str(jobs), "-o", str(tmp_path / "out.jsonl")), ("up", "--gpus", "none")):
        out = genq(*args, env=env, timeout=60)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 2, out.stderr
        assert "does not answer" in lines[0] and url.replace(PW, "***") in lines[0]
        assert PW not in out.stderr + out.stdout
        assert "embedded" in lines[1]
    assert not (tmp_path / "data" / "redis").exists()  # no second Redis was started
    up = genq("up", "--gpus", "none", env=env, timeout=60)
    assert "--embedded-redis" in up.stderr


@pytest.mark.parametrize("url", ["localhost:16401", f":{PW}@localhost:16401/0"])
def test_a_url_without_a_scheme_is_one_line(url):
    for args in (("submit", "hi"), ("config",)):
        out = genq(*args, env={"GENQ_BROKER_URL": url}, timeout=60)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "is not a Redis URL" in out.stderr and "redis://" in out.stderr
        assert PW not in out.stderr


# -- a model that cannot load --------------------------------------------------------------


@pytest.mark.parametrize(("model", "says"), [
    ("meta-llama/Meta-Llama-3-8B-Instruct", "HF_HUB_OFFLINE is set"),
    ("./no/such/model-folder", "no such folder")])
def test_generate_with_a_model_that_cannot_load_says_what_to_do_in_two_lines(tmp_path, model, says):
    jobs = tmp_path / "in.jsonl"
    jobs.write_text('{"prompt": "hi", "max_new_tokens": 2}\n')
    out = genq("generate", str(jobs), env={"GENQ_MODEL": model, "HF_HUB_OFFLINE": "1"}, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-3000:]
    assert lines[0].startswith("loading model") and len(lines) == 3, out.stderr  # + 2 lines
    assert says in lines[1] and "Traceback" not in out.stderr


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The hub's answers to a HEAD of ``<org>/<name>/resolve/main/config.json``: ``gated/*``
    gated, anything else an unknown repository (huggingface_hub reads ``X-Error-Code``)."""

    def do_HEAD(self):  # noqa: N802 - http.server's name
        gated = self.path.startswith("/gated/")
        self.send_response(401 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("X-Error-Message", "Access to this model is restricted" if gated
                         else "Repository not found")
        self.end_headers()

    def log_message(self, *_):
        pass


@pytest.mark.parametrize(("model", "hub", "says", "fix"), [
    ("someorg/some-model", "closed", "cannot be reached", "local folder"),
    ("gated/llama", "fake", "gated model", "HF_TOKEN"),
    ("someorg/no-such-model", "fake", "not a model on the Hugging Face hub", "HF_TOKEN")])
def test_a_hub_model_that_cannot_be_had_is_two_lines_at_once(tmp_path, model, hub, says, fix):
    """Not offline: a hub that cannot be reached (no retries, none of huggingface_hub's own
    log lines), a gated model, an unknown id: ``genq generate`` ends in two lines within
    seconds."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1] if hub == "fake" else free_port()
    jobs = tmp_path / "in.jsonl"
    jobs.write_text('{"prompt": "hi", "max_new_tokens": 2}\n')
    env = {"GENQ_MODEL": model, "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    try:
        out = genq("generate", str(jobs), env=env, timeout=120,
                   drop=("GENQ_BROKER_URL", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    finally:
        server.shutdown()
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and out.stdout == "", out.stderr[-3000:]
    assert len(lines) == 3 and lines[0].startswith("loading model"), out.stderr  # + 2 lines
    assert model in lines[1] and says in lines[1] and fix in lines[2], out.stderr
    assert time.monotonic() - started < 20, out.stderr  # huggingface_hub's retries sleep 23 s


def test_genq_run_and_up_stop_when_the_worker_cannot_load_its_model(tmp_path):
    """The embedded worker exits with the two lines in its note; `genq run` prints them and
    exits 2 instead of waiting; `genq up` prints the exact export line (password read from
    its file), does not restart a worker whose model cannot load, and stops by itself."""
    jobs = tmp_path / "in.jsonl"
    jobs.write_text('{"prompt": "hi", "max_new_tokens": 2}\n')
    env = {"GENQ_DATA_DIR": str(tmp_path / "data"), "GENQ_MODEL": str(tmp_path / "nothing-here"),
           "GENQ_BACKEND": "transformers"}
    started = time.monotonic()
    run = genq("run", str(jobs), "-o", str(tmp_path / "out.jsonl"), env=env, timeout=240)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.count("no such folder") == 1 and "Traceback" not in run.stderr  # once
    assert time.monotonic() - started < 200

    redis_port = free_port()
    up = genq("up", "--gpus", "none", "--port", str(free_port()), "--redis-port",
              str(redis_port), env=env, timeout=240)
    assert up.returncode == 2, up.stderr[-3000:]
    password = (tmp_path / "data" / "redis" / "password").read_text().strip()
    assert password not in up.stdout + up.stderr
    export = next(x.strip() for x in up.stderr.splitlines() if x.strip().startswith("export "))
    assert export == (f'export GENQ_BROKER_URL="redis://:$(cat {tmp_path}/data/redis/password)'
                      f'@127.0.0.1:{redis_port}/0"')
    assert up.stderr.count("cannot load model") == 1 and "restarting" not in up.stderr
    assert "no worker can run" in up.stderr


# -- what genq run waits for ---------------------------------------------------------------


def test_genq_run_says_what_it_waits_for(tmp_path, tiny_model_dir):
    jobs = tmp_path / "in.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": f"story {i}", "max_new_tokens": 4}) + "\n"
                            for i in range(3)))
    env = {"GENQ_DATA_DIR": str(tmp_path / "data"), "GENQ_MODEL": str(tiny_model_dir),
           "GENQ_BACKEND": "transformers", "GENQ_SELF_CHECK": "off"}
    run = genq("run", str(jobs), "-o", str(tmp_path / "out.jsonl"), env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"worker \S+: loading model \S+\.\.\.", run.stderr), run.stderr
    assert re.search(r"worker \S+ ready in \d+ s: ", run.stderr), run.stderr


# -- the gateway's errors ------------------------------------------------------------------


def test_native_errors_have_one_shape_and_openai_routes_speak_openai(gateway):
    http = gateway()
    for r, status in (
        (http.post("/v1/generations", json={"prompt": "x", "max_tokens": 5}), 422),
        (http.post("/v1/generations", json={"prompt": "x", "max_new_tokens": 5000}), 422),
        (http.get("/v1/generations/nope"), 404),
        (http.get("/v1/nothing-here"), 404),
        (http.post("/v1/generations", content=b"hi", headers={"content-type": "text/plain"}), 415),
    ):
        body = r.json()
        assert r.status_code == status, body
        assert set(body) == {"detail", "code"} and isinstance(body["detail"], list), body
        assert all(set(d) == {"loc", "msg", "type"} for d in body["detail"]), body
    hint = http.post("/v1/generations", json={"prompt": "x", "max_tokens": 5}).json()
    assert "max_new_tokens" in hint["detail"][0]["msg"], hint
    limit = http.post("/v1/generations", json={"prompt": "x", "max_new_tokens": 5000}).json()
    assert limit["detail"][0]["loc"] == ["body", "max_new_tokens"], limit

    # no content type (or curl -d's form type): read as JSON
    raw = json.dumps({"prompt": "x", "max_new_tokens": 2}).encode()
    for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}):
        r = http.post("/v1/generations", content=raw, headers=headers)
        assert r.status_code == 202, r.text

    for max_field in ("max_tokens", "max_completion_tokens"):
        r = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], max_field: 5000})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == max_field, error
        assert error["message"].startswith(f"{max_field}: 5000") and "max_new" not in error["message"]
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5000})
    assert r.json()["error"]["param"] == "max_tokens"

    # each surface's name told on the other: OpenAI's max_tokens on every native path (here
    # /v1/jobs; genq run and the client in test_schema), genqueue's on the OpenAI routes
    r = http.post("/v1/jobs", json=[{"prompt": "x", "max_tokens": 5}])
    assert r.status_code == 422 and "takes max_new_tokens" in r.json()["detail"][0]["msg"], r.text
    for url, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                      ("/v1/completions", {"prompt": "hi"})):
        error = http.post(url, json={**body, "max_new_tokens": 5}).json()["error"]
        assert error["param"] == "max_new_tokens", error
        assert error["message"] == ("max_new_tokens: max_new_tokens is genqueue's native name; "
                                    "the OpenAI routes take max_tokens"), error

    # no content type: JSON on every route that takes a JSON object (an OpenAI route refuses
    # another type in its own shape); a /v1/jobs body that starts with [ is a JSON list
    r = http.post("/v1/jobs", content=b' [{"prompt": "x", "max_new_tokens": 2}]')
    assert r.status_code == 202 and r.json()["counts"]["total"] == 1, r.text
    line = {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
    upload = http.post("/v1/files", data={"purpose": "batch"},
                       files={"file": ("in.jsonl", json.dumps(line) + "\n")}).json()
    r = http.post("/v1/batches", content=json.dumps({
        "input_file_id": upload["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).encode())
    assert r.status_code == 200 and r.json()["input_file_id"] == upload["id"], r.text
    r = http.post("/v1/chat/completions", content=json.dumps(body).encode(),
                  headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], r.text
