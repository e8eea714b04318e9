"""Offline checks of the Kubernetes manifests (deploy/kubernetes/): each against the
Kubernetes JSON schemas (the KEDA ScaledObject against a schema written here), Secret
references, a persistent non-evicting Redis, no secret on a command line, the gateway's
probes, the GPU worker, and KEDA scaling the worker on the gateway's /demand. The Redis HA
manifest (redis-ha.yaml) is checked in test_deploy_ha."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy_files import (
    K8S,
    check_redis_container,
    env_of,
    k8s_command,
    k8s_documents,
    k8s_env,
    k8s_one,
    redis_container,
)

K8S_VERSION = kubernetes_validate.latest_version()
KEDA_KINDS = {"ScaledObject"}


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
