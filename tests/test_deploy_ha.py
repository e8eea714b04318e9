"""The high-availability Redis: Sentinel and TLS in the compose profile `ha` and in
deploy/kubernetes/redis-ha.yaml. Static checks of the profile, the data node and sentinel
start scripts, the StatefulSet, the example Secret and deploy/README.md's HA commands; then
the start scripts run on real redis-server processes (certificates from the README's openssl
commands): a SIGKILLed primary fails over, and rejoins as a replica."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.deploy_files import (
    COMPOSE,
    HA_BROKER_URL,
    HA_SENTINELS,
    K8S,
    ROOT,
    SECRETS,
    command_list,
    env_of,
    interpolated,
    k8s_command,
    k8s_one,
    load_compose,
)
from worker.stack import free_port

# -- high availability: Sentinel and TLS (compose profile `ha`, redis-ha.yaml) -------------

DEPLOY_README = ROOT / "deploy" / "README.md"
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
