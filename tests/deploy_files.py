"""Shared by the deployment tests (test_deploy_compose, test_deploy_kubernetes,
test_deploy_ha): the deployment files' paths, loading docker-compose.yml and the Kubernetes
manifests, compose's interpolation and Kubernetes' ``$(VAR)`` expansion, the secrets markers,
running a Redis container's command here on a free port, and the HA broker URL the compose
services use. A helper used by one of those modules lives in it instead."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import yaml

from worker.stack import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "kubernetes"


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def k8s_one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in k8s_documents()
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def command_list(command) -> list[str]:
    return command.split() if isinstance(command, str) else list(command)


# secrets as the operator exports them: markers to look for where they must not be
SECRETS = {"REDIS_PASSWORD": "redis-pw-4f1c", "GENQ_API_KEYS": "api-key-4f1c",
           "FLOWER_BASIC_AUTH": "admin:flower-pw-4f1c", "HF_TOKEN": "hf-token-4f1c"}


def interpolated(obj, env: dict[str, str]):
    """A loaded compose document with compose's interpolation applied to every string:
    ``$$`` -> ``$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``."""
    if isinstance(obj, dict):
        return {k: interpolated(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolated(v, env) for v in obj]
    if not isinstance(obj, str):
        return obj

    def value(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("plain")
        if env.get(name):
            return env[name]
        assert m.group("op") != "?", f"{name} must be set: {m.group('arg')}"
        return m.group("arg") or ""

    return re.sub(r"\$\$|\$\{(?P<braced>\w+)(?::?(?P<op>[-?])(?P<arg>[^}]*))?\}|\$(?P<plain>\w+)",
                  value, obj)


def k8s_env(ctr: dict) -> dict[str, str]:
    """A container's environment, a Secret's key standing for each secretKeyRef's value."""
    return {e["name"]: e.get("value", "secret-" + e.get("valueFrom", {}).get(
        "secretKeyRef", {}).get("key", "")) for e in ctr.get("env", [])}


def k8s_command(ctr: dict) -> list[str]:
    """A container's command and args with Kubernetes' ``$(VAR)`` expansion applied."""
    env = k8s_env(ctr)
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), word)
            for word in ctr.get("command", []) + ctr.get("args", [])]


@contextmanager
def redis_container(command: list[str], env: dict[str, str], workdir: Path):
    """Run a Redis container's command here as its image would (``redis-server`` on PATH, in
    the data directory ``workdir``) on a free port; yields the process and a client that has
    no password."""
    port = free_port()
    shim = workdir / "bin"
    shim.mkdir()
    (shim / "redis-server").write_text(
        f'#!/bin/sh\nexec {shutil.which("redis-server")} "$@" --port {port}\n')
    (shim / "redis-server").chmod(0o755)
    proc = subprocess.Popen(command, env={**env, "PATH": f"{shim}:{os.environ['PATH']}"},
                            cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=2)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, "the Redis command exited"
            assert time.monotonic() < deadline, "the Redis command never listened"
            try:
                client.ping()
                break
            except redis.AuthenticationError:
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield proc, client
    finally:
        proc.terminate()
        proc.wait(10)


def check_redis_container(proc: subprocess.Popen, client: redis.Redis, password: str) -> None:
    """Password required and not on any command line; AOF on; no eviction."""
    with pytest.raises(redis.AuthenticationError):
        client.ping()
    assert password not in " ".join(proc.args)
    assert password.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    authed = redis.Redis(port=client.connection_pool.connection_kwargs["port"],
                         password=password, socket_timeout=2)
    assert authed.config_get("appendonly") == {"appendonly": "yes"}
    assert authed.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}


def env_of(ctr: dict) -> dict:
    return {e["name"]: e for e in ctr.get("env", [])}


# the high-availability stack (compose profile `ha`): its sentinels, and the broker URL of
# its genqueue services
HA_SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
HA_BROKER_URL = ";".join(f"sentinel://:${{REDIS_PASSWORD:?set REDIS_PASSWORD}}@{host}:26379"
                         for host in HA_SENTINELS) + "/0"
