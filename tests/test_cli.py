"""The CLI as a user runs it: `genq run` brings up its own stack, `--resume`, bad lines,
`genq config`, and the client importing no model library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, ROOT, ctrl_c_default, example_requests
from tests.test_secrets import FORMS, PW

pytestmark = pytest.mark.process  # every test runs genq as a subprocess


def genq(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``genq ARGS`` with ``env`` over ours (a None value unsets that variable)."""
    merged = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True,
                          text=True, env=merged, timeout=timeout, cwd=ROOT)


def test_client_imports_no_model_library():
    code = ("import sys, worker.client, worker.api; "
            "bad = [m for m in ('torch', 'transformers', 'unsloth', 'peft') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_config_masks_secrets():
    out = genq("config", "--json", env={"GENQ_BROKER_URL": "rediss://user:s3cret@redis.example:6380/1",
                                        "GENQ_API_KEYS": "key-one,key-two"})
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert "s3cret" not in out.stdout and "key-one" not in out.stdout
    assert shown["broker_url"] == "rediss://user:***@redis.example:6380/1"
    assert shown["result_url"] == shown["broker_url"] and shown["api_keys"] == ["***", "***"]


@pytest.mark.parametrize(("url", "masked"), [form for form in FORMS if form[0].startswith(
    ("redis", "sentinel")) and " " not in form[0]])
def test_config_masks_every_url_form_that_carries_a_password(url, masked):
    """User info, ``password=`` and ``sentinel_kwargs`` queries, sentinel node lists: in the
    broker and the result URL, as JSON and as the table (wide enough not to wrap)."""
    env = {"GENQ_BROKER_URL": url, "GENQ_RESULT_URL": url.replace(PW, PW + "-results"),
           "COLUMNS": "400"}
    out = genq("config", "--json", env=env)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["broker_url"] == shown["result_url"] == masked
    table = genq("config", env=env)
    assert table.returncode == 0 and masked in table.stdout, table.stdout + table.stderr
    assert PW not in out.stdout + out.stderr + table.stdout + table.stderr


@pytest.mark.slow
def test_genq_run_embedded_stack_equals_the_engine(tmp_path, demo_engine, cache_dir):
    """The README's main job over all of examples/prompts.jsonl (OpenAI Batch lines, 64 tokens
    each) with two bad lines slipped in: no broker configured, default backend."""
    subset = tmp_path / "in.jsonl"
    lines = EXAMPLES.read_text().splitlines()
    bad_line = '{"custom_id": "bad", "body": {"messages": []}, "url": "/v1/chat/completions"}'
    over_limit = json.loads(lines[0]) | {"custom_id": "long"}
    over_limit["body"] = {**over_limit["body"], "max_tokens": 5000}  # GENQ_MAX_NEW_TOKENS_LIMIT
    unclosed = '{"custom_id": "unclosed", "body": {"messages": [{"role": "user", "content": "x"}]}'
    subset.write_text("\n".join(lines[:10] + [bad_line, "{oops", "", json.dumps(over_limit),
                                              unclosed] + lines[10:]) + "\n")
    out_path = tmp_path / "out.jsonl"
    env = {"GENQ_DATA_DIR": str(tmp_path / "data"), "GENQ_CACHE_DIR": str(cache_dir)}
    env_without_broker = {k: v for k, v in os.environ.items() if k != "GENQ_BROKER_URL"}
    run = subprocess.run([sys.executable, "-m", "worker.cli", "run", str(subset), "-o", str(out_path)],
                         capture_output=True, text=True, env={**env_without_broker, **env},
                         timeout=900, cwd=ROOT)
    assert run.returncode == 1, run.stderr[-3000:]  # bad lines -> non-zero, good ones ran
    errors = [json.loads(x) for x in Path(f"{out_path}.errors").read_text().splitlines()]
    assert [e["line"] for e in errors] == [11, 12, 14, 15]  # lines of the file (13 is blank)
    assert "above the limit" in errors[2]["error"] and "missing '}'" in errors[3]["error"]
    assert "line 14" in run.stderr and "request" not in errors[2]["error"]
    results = [json.loads(x) for x in out_path.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [f"req-{i:03d}" for i in range(1, 65)]
    assert all(r["status"] == "succeeded" for r in results)
    requests = example_requests(max_new_tokens=64)
    assert [r["text"] for r in results] == [e["text"] for e in demo_engine.generate(requests)]
    assert "embedded Redis" in run.stderr

    again = subprocess.run([sys.executable, "-m", "worker.cli", "run", str(subset), "-o", str(out_path),
                            "--resume"], capture_output=True, text=True,
                           env={**env_without_broker, **env}, timeout=300, cwd=ROOT)
    assert "64 kept from before" in again.stderr and "embedded Redis" not in again.stderr
    assert [json.loads(x) for x in out_path.read_text().splitlines()] == results


def test_help_names_every_command_in_one_line():
    out = genq("--help", env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    for command in ("worker", "api", "up", "submit", "status", "result", "cancel", "job", "jobs",
                    "config", "run", "generate", "bench"):
        line = next((x for x in out.stdout.splitlines() if f" {command} " in x), "")
        assert len(line.split(command, 1)[1].strip(" │")) > 10, (command, out.stdout)


@pytest.mark.slow
def test_submit_status_result_cancel_job(redis_url, client, start_worker, tiny_model_dir):
    """Each request command against a real Redis and worker, as JSON and as a table."""
    env = {"GENQ_BROKER_URL": redis_url}
    queued = genq("submit", "cancel me before any worker runs", "--json", env=env)
    assert queued.returncode == 0, queued.stderr
    rid = json.loads(queued.stdout)["id"]
    assert json.loads(genq("status", rid, "--json", env=env).stdout)["status"] == "queued"
    cancelled = genq("cancel", rid, "--json", env=env)
    assert json.loads(cancelled.stdout) == {"id": rid, "cancelled": True}
    assert "cancelled" in genq("status", rid, env=env).stdout  # the table form

    start_worker(GENQ_MODEL=str(tiny_model_dir))
    done = genq("submit", "Hello", "--max-new-tokens", "4", "--wait", "--json", env=env)
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded" and result["usage"]["completion_tokens"] >= 1
    assert json.loads(genq("result", result["id"], "--json", env=env).stdout) == result
    table = genq("result", result["id"], env=env).stdout
    assert result["id"] in table and "succeeded" in table and "{" not in table.splitlines()[0]

    job_id = client.submit_many([{"prompt": f"p{i}", "max_new_tokens": 2} for i in range(5)])
    client.wait_job(job_id, timeout=120)
    shown = json.loads(genq("job", job_id, "--json", env=env).stdout)
    assert shown["status"] == "completed" and shown["counts"]["succeeded"] == 5
    assert "completed" in genq("job", job_id, env=env).stdout

    missing = genq("status", "no-such-id", env=env)
    assert missing.returncode == 2 and "unknown or expired" in missing.stderr


def test_expected_failures_are_one_or_two_lines_not_tracebacks(tmp_path, redis_url):
    import socket

    from worker.stack import free_port

    nowhere = {"GENQ_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    taken = socket.create_server(("127.0.0.1", 0))
    no_broker = {"GENQ_BROKER_URL": None, "GENQ_DATA_DIR": str(tmp_path / "data")}
    up = ("up", "--gpus", "none", "--port", str(free_port()))
    cases = [(("submit", "hi"), nowhere, "cannot reach the broker"),
             (("status", "some-id"), nowhere, "cannot reach the broker"),
             (("result", "some-id"), nowhere, "cannot reach the broker"),
             (("cancel", "some-id"), nowhere, "cannot reach the broker"),
             (("job", "some-job"), nowhere, "cannot reach the broker"),
             (("status", "no-such-id"), {"GENQ_BROKER_URL": redis_url}, "not found"),
             (("run", str(tmp_path / "missing.jsonl")), {}, "cannot read"),
             (("generate", str(tmp_path / "missing.jsonl")), {}, "cannot read"),
             (("worker", "--gpu", "7"), {}, "--gpu 7"),
             (("job",), {}, "Missing argument"),
             ((*up, "--redis-port", str(taken.getsockname()[1])), no_broker, "is taken"),
             ((*up, "--redis-port", "99999"), no_broker, "65535"),
             (("config",), {"GENQ_LOG_FORMAT": "xml"}, "GENQ_LOG_FORMAT takes auto, json, console"),
             (("config",), {"GENQ_LOG_LEVEL": "loud"}, "GENQ_LOG_LEVEL takes DEBUG")]
    with taken:
        runs = [genq(*args, env=env, timeout=120) for args, env, _ in cases]
    for (args, _, says), out in zip(cases, runs, strict=True):
        lines = [x for x in out.stderr.splitlines() if x.strip()]
        assert out.returncode == 2, (args, out.returncode, out.stderr[-500:])
        assert says in out.stderr and "Traceback" not in out.stderr, (args, out.stderr[-500:])
        assert len(lines) <= 3 and "internal" not in out.stderr, (args, lines)
    debug = genq("--debug", "status", "some-id", env=nowhere, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConnectionError" in debug.stderr


def test_config_shows_every_effective_value_and_the_readme_lists_every_setting():
    import re

    from worker.ops.settings import Settings

    out = genq("config", "--json")
    shown = json.loads(out.stdout)
    assert set(shown) == set(Settings.model_fields)
    assert [k for k, v in shown.items() if v is None] == []  # defaults resolved, not null
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(GENQ_[A-Z0-9_]+)` \|", readme, re.M))
    assert listed == {f"GENQ_{k.upper()}" for k in Settings.model_fields}


@pytest.mark.slow
def test_ctrl_c_during_run_keeps_what_finished_and_resume_finishes_it(tmp_path, tiny_model_dir,
                                                                     cache_dir):
    import signal
    import time

    source = tmp_path / "in.jsonl"
    # 20 short lines finish at once, 140 long ones are still running when Ctrl-C comes
    source.write_text("".join(json.dumps({"prompt": f"line {i}", "max_new_tokens": 4 if i < 20
                                          else 600, "custom_id": f"c{i}"}) + "\n"
                              for i in range(160)))
    out_path = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "GENQ_BROKER_URL"}
    env.update(GENQ_DATA_DIR=str(tmp_path / "data"), GENQ_CACHE_DIR=str(cache_dir),
               GENQ_MODEL=str(tiny_model_dir), GENQ_BACKEND="transformers")
    first = subprocess.Popen([sys.executable, "-m", "worker.cli", "run", str(source), "-o",
                              str(out_path)], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                             preexec_fn=ctrl_c_default)
    seen = ""
    while "job " not in seen:
        seen += first.stderr.readline()
        assert first.poll() is None, seen
    db = next(x for x in seen.split() if x.startswith("127.0.0.1:"))
    import redis as redis_lib

    password = (tmp_path / "data" / "redis" / "password").read_text().strip()
    r = redis_lib.Redis(host="127.0.0.1", port=int(db.split(":")[1].rstrip(")")), password=password)
    deadline = time.monotonic() + 180
    while sum(int(r.hget(k, "succeeded") or 0) for k in r.keys("genq:job:*") if b":" not in k[9:]) < 10:
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-2000:]
    assert "--resume" in err and "interrupted" in err
    partial = [json.loads(x) for x in out_path.read_text().splitlines()]
    assert [p["line"] for p in partial] == list(range(1, 161))  # every line, in input order
    finished = [p for p in partial if p["status"] == "succeeded"]
    assert 10 <= len(finished) < 160 and all(p["text"] for p in finished)
    assert {p["status"] for p in partial} - {"succeeded"} <= {"queued", "running"}

    again = subprocess.run([sys.executable, "-m", "worker.cli", "run", str(source), "-o",
                            str(out_path), "--resume"], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(finished)} finished line(s) kept" in again.stderr
    final = [json.loads(x) for x in out_path.read_text().splitlines()]
    assert [f["custom_id"] for f in final] == [f"c{i}" for i in range(160)]
    assert all(f["status"] == "succeeded" for f in final)
    assert [f for f in final if f["line"] in {p["line"] for p in finished}] == finished


@pytest.mark.slow
def test_ctrl_c_while_the_worker_loads_stops_it_within_seconds(redis_url, cache_dir, tmp_path):
    """Loading takes seconds to minutes and holds nothing: Ctrl-C must not wait for it."""
    import signal
    import time

    import redis as redis_lib

    log = tmp_path / "worker.log"
    env = {**os.environ, "GENQ_BROKER_URL": redis_url, "GENQ_CACHE_DIR": str(cache_dir),
           "GENQ_BACKEND": "auto"}  # unsloth's import: the slowest start there is
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--gpu", "none",
                                 "--name", "w@ctrl-c"], env=env, stdout=out, stderr=out, cwd=ROOT,
                                preexec_fn=ctrl_c_default)
    deadline = time.monotonic() + 120
    while "engine_loading" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the model load
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    proc.wait(timeout=60)
    took = time.monotonic() - sent
    assert took < 3.0, f"{took:.1f} s"  # the bound users are promised is 2 s; slack for CI load
    assert "worker_ready" not in log.read_text() and "worker_stopped_while_loading" in log.read_text()
    assert not redis_lib.Redis.from_url(redis_url).exists("genq:worker:w@ctrl-c")
