"""Every code block of README.md and deploy/README.md is run as written, so a snippet that
cannot run fails CI.

Shell blocks run in bash against real processes (their own Redis, workers and gateway), with
only what a test must change: private ports instead of 6379/8000, ``--gpu none`` on a machine
without a GPU, a scratch home directory, the tiny model instead of the demo model where a
block only needs *a* model, and servers that a reader starts in another terminal started in
the background and waited for. Python blocks run as scripts. Blocks that need a container
engine or a Kubernetes cluster are checked against the files they use. ``text`` blocks are
diagrams and formulas. A block no rule here covers fails the test.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES, ROOT

DOCS = (ROOT / "README.md", ROOT / "deploy" / "README.md")
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```$", re.M | re.S)


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        source = path.read_text()
        for m in FENCE.finditer(source):
            indent = len(m.group(1))
            text = "\n".join(line[indent:] for line in m.group(3).splitlines())
            found.append(Block(path, source[:m.start()].count("\n") + 1, m.group(2), text))
    return found


def block(lang: str, contains: str) -> Block:
    matches = [b for b in blocks() if b.lang == lang and contains in b.text]
    assert len(matches) == 1, f"{len(matches)} {lang} blocks contain {contains!r}"
    return matches[0]


# each rule: (language, a string that picks the block out)
EXECUTED = [("bash", "make demo"), ("bash", "genq run examples/prompts.jsonl"),
            ("bash", "genq up --gpus all"), ("python", "GenerationClient()"),
            ("python", "load_engine(\"demo\")"), ("python", "app.send_task(\"genq.generate\""),
            ("redis", "ACL SETUSER")]
CHECKED_OFFLINE = [("bash", "docker build"), ("bash", "docker compose up"),
                   ("bash", "kubectl apply")]


def test_every_code_block_has_a_rule():
    rules = EXECUTED + CHECKED_OFFLINE
    for b in blocks():
        covered = [r for r in rules if b.lang == r[0] and r[1] in b.text]
        assert len(covered) == 1 or (b.lang == "text" and not covered), (
            f"{b}: a ```{b.lang} block that tests/test_docs.py does not run")
    assert {b.lang for b in blocks()} <= {"bash", "python", "redis", "text"}


# -- shell blocks against real processes -------------------------------------------------------

def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _as_test_script(text: str, redis_port: int, http_port: int) -> str:
    """The block with private ports, a CPU worker where there is no GPU, and foreground
    servers put in the background and waited for."""
    out = ["set -eo pipefail"]
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = line.replace("6379", str(redis_port)).replace("8000", str(http_port))
        if not _has_gpu():
            line = line.replace("--gpu 0", "--gpu none")
        command = line.split(" #")[0].rstrip()
        if command.startswith("genq up"):
            out += [f"{command} &",
                    f"until curl -sf localhost:{http_port}/readyz >/dev/null; do sleep 0.5; done"]
            continue
        out.append(line)
        if "redis-server" in command:
            out.append(f"until redis-cli -p {redis_port} ping >/dev/null 2>&1; do sleep 0.1; done")
    return "\n".join(out) + "\n"


def _run_shell(text: str, workdir: Path, env: dict[str, str], timeout: float):
    """Run a shell block in ``workdir``; stop every process it started, even in background."""
    from worker.stack import free_port

    script = _as_test_script(text, free_port(), free_port())
    out_file, err_file = workdir / "block.out", workdir / "block.err"
    # files, not pipes: the servers left in the background would hold pipes open
    with out_file.open("w") as out, err_file.open("w") as err:
        proc = subprocess.Popen(["bash", "-c", script], cwd=workdir, env=env, stdout=out,
                                stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            _stop_group(proc.pid)
    return proc.returncode, out_file.read_text(), err_file.read_text()


def _stop_group(pgid: int) -> None:
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture
def user_dir(tmp_path, tiny_model_dir, cache_dir):
    """A scratch home with the repository's examples and virtual environment, and the
    environment a reader's shell would have (no broker configured), on the tiny model."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    (work / ".venv").symlink_to(Path(sys.prefix))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GENQ_") and k != "VIRTUAL_ENV"}
    env.update(HOME=str(tmp_path / "home"), GENQ_CACHE_DIR=str(cache_dir),
               GENQ_MODEL=str(tiny_model_dir), GENQ_BACKEND="transformers",
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    return work, env


@pytest.mark.process
def test_two_commands_block(tmp_path):
    """`make demo` and `make test` are the targets CI and the README name (CI runs `make test`
    itself; the quick-start test below runs the `genq run` that `make demo` runs)."""
    text = block("bash", "make demo").text
    assert re.findall(r"^make (\w+)", text, re.M) == ["demo", "test"]
    dry = subprocess.run(["make", "-n", "demo", "test", "VENV=.venv"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert ".venv/bin/genq run examples/prompts.jsonl -o out/results.jsonl" in dry
    assert ".venv/bin/python -m pytest" in dry
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
@pytest.mark.process
def test_quick_start_block_runs(user_dir):
    work, env = user_dir
    rc, out, err = _run_shell(block("bash", "genq run examples/prompts.jsonl").text, work, env,
                              timeout=900)
    assert rc == 0, err[-3000:]
    results = [json.loads(x) for x in (work / "out" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 64 and all(r["status"] == "succeeded" for r in results)
    generated = [json.loads(x) for x in out.splitlines() if x.startswith('{"line"')]
    assert [g["line"] for g in generated] == list(range(1, 65))  # genq generate: pure JSONL
    assert "broker_url" in out  # genq config


@pytest.mark.slow
@pytest.mark.process
def test_gateway_block_runs(user_dir):
    work, env = user_dir
    rc, out, err = _run_shell(block("bash", "genq up --gpus all").text, work, env, timeout=600)
    assert rc == 0, err[-3000:]
    single, job, *results = _json_values(out)
    assert single["status"] in ("queued", "running", "succeeded") and single["id"]
    assert job["counts"]["total"] == 64
    custom_ids = [json.loads(x)["custom_id"] for x in EXAMPLES.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == custom_ids


def _json_values(text: str) -> list:
    """Every JSON object printed at the start of a line (pretty-printed or not), in order."""
    decoder, values, pos = json.JSONDecoder(), [], 0
    while (start := text.find("{", pos)) != -1:
        if start and text[start - 1] != "\n":
            pos = start + 1
            continue
        try:
            value, pos = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        values.append(value)
    return values


# -- Python blocks as scripts ------------------------------------------------------------------

def test_client_block_runs(redis_url, start_worker, tiny_model_dir, tmp_path):
    start_worker(GENQ_MODEL=str(tiny_model_dir))
    script = tmp_path / "client_block.py"
    script.write_text(block("python", "GenerationClient()").text)
    env = {**os.environ, "GENQ_BROKER_URL": redis_url}
    run = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\np0 " in run.stdout and "\np1 " in run.stdout
    counts = ast.literal_eval(run.stdout.strip().splitlines()[-1])  # the dict print() shows
    assert counts["total"] == 64 and counts["succeeded"] == 64


def test_celery_block_runs(redis_url, start_worker, tiny_model_dir, tmp_path):
    """The Celery block as a plain Celery app's script (run outside the repository)."""
    start_worker(GENQ_MODEL=str(tiny_model_dir))
    script = tmp_path / "celery_block.py"
    script.write_text(block("python", 'app.send_task("genq.generate"').text)
    env = {**os.environ, "GENQ_BROKER_URL": redis_url}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0] in ("PENDING", "STARTED", "SUCCESS") and lines[2] == "succeeded"
    assert lines[-1].startswith("FAILURE invalid_request: ")


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.model  # the block loads the demo model
def test_engine_block_runs(tmp_path, cache_dir):
    script = tmp_path / "engine_block.py"
    script.write_text(block("python", 'load_engine("demo")').text)
    env = {**os.environ, "GENQ_CACHE_DIR": str(cache_dir)}
    run = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "completion_tokens" in run.stdout


# -- the Redis ACL block, then a worker and a client as that user ------------------------------

def test_acl_block_gives_genqueue_all_it_needs(redis_url, start_worker, tiny_model_dir):
    import redis

    from worker.client import GenerationClient
    from worker.ops.settings import Settings

    command = re.sub(r"\\\n\s*", " ", block("redis", "ACL SETUSER").text).strip()
    admin = redis.Redis.from_url(redis_url)
    assert admin.execute_command(*shlex.split(command.replace("PASSWORD", "s3cret"))) in (
        b"OK", "OK", True)
    try:
        port = admin.connection_pool.connection_kwargs["port"]
        as_genq = f"redis://genq:s3cret@127.0.0.1:{port}/0"
        start_worker(GENQ_BROKER_URL=as_genq, GENQ_MODEL=str(tiny_model_dir))
        client = GenerationClient(settings=Settings(broker_url=as_genq))
        job = client.submit_many([{"prompt": f"n{i}", "max_new_tokens": 3} for i in range(4)])
        assert client.wait_job(job, timeout=120)["counts"]["succeeded"] == 4
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis.Redis.from_url(as_genq).flushall()  # and nothing dangerous
    finally:
        admin.execute_command("ACL", "DELUSER", "genq")


# -- blocks that need a container engine or a cluster: checked against their files --------------

def test_docker_build_block_names_real_targets():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", dockerfile, re.M | re.I))
    builds = re.findall(r"docker build -f (\S+) --target (\S+)", block("bash", "docker build").text)
    assert builds and all((ROOT / f).is_file() and t in stages for f, t in builds)


def test_compose_block_names_real_services_profiles_and_variables():
    text = block("bash", "docker compose up").text
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    profiles = {p for s in services.values() for p in s.get("profiles", [])}
    assert set(re.findall(r"--profile (\S+)", text)) <= profiles
    named = re.search(r"--profile cpu up -d (.+?)\s+#", text).group(1).split()
    assert set(named) <= set(services)
    raw = (ROOT / "docker-compose.yml").read_text()
    assert all(f"${{{var}" in raw for var in re.findall(r"^export (\w+)=", text, re.M))


def test_kubectl_block_applies_files_that_exist():
    text = block("bash", "kubectl apply").text
    files = re.findall(r"-f (\S+\.yaml)", text)
    assert "secret.yaml" in files  # the reader's copy of the example
    for name in files:
        path = ROOT / name if name != "secret.yaml" else ROOT / "deploy" / "kubernetes" / \
            "secret.example.yaml"
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs and all(d["metadata"].get("namespace") == "genqueue" for d in docs), name
    assert "kubectl create namespace genqueue" in text
