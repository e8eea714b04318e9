"""Redis behind TLS and behind Sentinel, on real redis-server processes the tests start."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from worker.stack import free_port

pytestmark = pytest.mark.slow
PASSWORD = "ha-test-password"


def make_certs(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject, issuer, key, signer, ca: bool, san=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "genqueue test CA")])
    ca_cert = cert(ca_name, ca_name, ca_key, ca_key, True)
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name,
                  key, ca_key, False, [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                       x509.DNSName("localhost")])
    files = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    files[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    files[2].chmod(0o600)
    return files


def start_redis(folder: Path, name: str, lines: list[str],
                sentinel: bool = False) -> subprocess.Popen:
    """A redis-server (or sentinel) from a config file (no secret on its command line)."""
    conf = folder / f"{name}.conf"
    conf.write_text("\n".join([f'dir "{folder}"', "save \"\"", "appendonly no", *lines]) + "\n")
    conf.chmod(0o600)
    return subprocess.Popen(["redis-server", str(conf), *(["--sentinel"] if sentinel else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def wait_ping(client: redis.Redis, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.ping():
                return
        except redis.RedisError:
            pass
        assert time.monotonic() < deadline, "redis did not answer"
        time.sleep(0.1)


def test_tls_broker_and_results_with_a_ca_file(tmp_path, start_worker, tiny_model_dir):
    from worker.client import GenerationClient
    from worker.ops.redisconn import connect
    from worker.ops.settings import Settings

    ca, cert, key = make_certs(tmp_path)
    port = free_port()
    server = start_redis(tmp_path, "tls", ["port 0", f"tls-port {port}", f'tls-cert-file "{cert}"',
                                           f'tls-key-file "{key}"', f'tls-ca-cert-file "{ca}"',
                                           "tls-auth-clients no", f"requirepass {PASSWORD}"])
    try:
        url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"
        settings = Settings(broker_url=url, redis_ca_file=ca)
        wait_ping(connect(url, settings))
        with pytest.raises(redis.ConnectionError):  # without the CA the server is not trusted
            connect(url, Settings(broker_url=url)).ping()
        client = GenerationClient(settings=settings)
        rid = client.submit(prompt="over TLS", max_new_tokens=3)
        start_worker(GENQ_MODEL=str(tiny_model_dir), GENQ_BROKER_URL=url,
                     GENQ_REDIS_CA_FILE=str(ca), wait_ready=False)
        done = client.wait(rid, timeout=120)
        assert done["status"] == "succeeded" and done["usage"]["completion_tokens"] >= 1
        log = (start_worker.log_dir / "w1@test.log").read_text()
        assert "insecure" not in log and "rediss://:***@" in log  # verified, password masked
    finally:
        server.kill()
        server.wait()


def test_sentinel_failover_mid_job(tmp_path, start_worker, tiny_model_dir):
    """A primary, a replica and three sentinels; two workers and the gateway run a 500-request
    job through the sentinels; SIGKILL the primary mid-job. Everything reconnects by itself and
    the job finishes with every request counted once."""
    import httpx

    from worker.client import GenerationClient
    from worker.ops.settings import Settings

    auth = [f"requirepass {PASSWORD}", f"masterauth {PASSWORD}"]
    primary_port, replica_port = free_port(), free_port()
    primary = start_redis(tmp_path, "primary", [f"port {primary_port}", *auth,
                                                "min-replicas-to-write 1",
                                                "min-replicas-max-lag 10"])
    replica = start_redis(tmp_path, "replica", [f"port {replica_port}", *auth,
                                                f"replicaof 127.0.0.1 {primary_port}"])
    sentinel_ports = [free_port() for _ in range(3)]
    sentinels = [start_redis(tmp_path, f"sentinel{i}", [
        f"port {port}", "sentinel resolve-hostnames no",
        f"sentinel monitor mymaster 127.0.0.1 {primary_port} 2",
        f"sentinel auth-pass mymaster {PASSWORD}",
        "sentinel down-after-milliseconds mymaster 1000",
        "sentinel failover-timeout mymaster 10000", f"requirepass {PASSWORD}"], sentinel=True)
        for i, port in enumerate(sentinel_ports)]
    procs = [primary, replica, *sentinels]
    try:
        direct = redis.Redis(port=replica_port, password=PASSWORD)
        wait_ping(direct)
        deadline = time.monotonic() + 20
        while direct.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "replica never synced"
            time.sleep(0.2)
        url = ";".join(f"sentinel://:{PASSWORD}@127.0.0.1:{p}" for p in sentinel_ports) + "/0"
        settings = Settings(broker_url=url)
        client = GenerationClient(settings=settings)
        wait_ping(client.store.redis, 30)
        for name in ("w1@ha", "w2@ha"):
            start_worker(name=name, wait_ready=False, GENQ_MODEL=str(tiny_model_dir),
                         GENQ_BROKER_URL=url, GENQ_MAX_BATCH_SIZE="8")
        api_port = free_port()
        env = {**os.environ, "GENQ_BROKER_URL": url, "GENQ_MAX_PENDING": "10000"}
        gateway = subprocess.Popen([sys.executable, "-m", "worker.cli", "api",
                                    "--port", str(api_port)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        procs.append(gateway)
        http = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30)
        deadline = time.monotonic() + 180
        while len(client.store.workers()) < 2:
            assert time.monotonic() < deadline, "workers never became ready"
            time.sleep(0.2)
        while True:
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = "\n".join(f'{{"prompt": "request {i}", "max_new_tokens": 6}}' for i in range(500))
        job = http.post("/v1/jobs", content=body,
                        headers={"content-type": "application/jsonl"}).json()["id"]
        while client.job(job)["counts"]["succeeded"] < 100:
            time.sleep(0.05)
        at_kill = client.job(job)["counts"]["succeeded"]
        primary.kill()
        killed = time.monotonic()
        first_after, unavailable = None, 0
        deadline = killed + 240
        while True:
            try:
                r = http.get(f"/v1/jobs/{job}")
            except httpx.HTTPError:
                r = None
            if r is None or r.status_code == 503:
                unavailable += 1
            elif r.status_code == 200:
                counts = r.json()["counts"]
                if first_after is None and counts["succeeded"] > at_kill:
                    first_after = time.monotonic() - killed
                if counts["queued"] == counts["running"] == 0:
                    break
            assert time.monotonic() < deadline, "the job did not finish after the failover"
            time.sleep(0.2)
        new_primary = client.store.redis.connection_pool.get_master_address()
        assert new_primary[1] == replica_port
        done = client.job(job)
        counts = done["counts"]
        results = list(client.job_results(job))
        assert counts["total"] == 500 and counts["succeeded"] == 500, counts
        assert len({r["id"] for r in results}) == 500
        assert all(r["status"] == "succeeded" for r in results)  # none lost, none stuck
        attempts = client.store.redis.mget([f"genq:attempts:{r['id']}" for r in results])
        rerun = sum(int(a or 0) > 1 for a in attempts)
        print(f"failover: killed at {at_kill}/500, first result on the new primary after "
              f"{first_after:.1f} s, gateway 503 or unreachable on {unavailable} polls, "
              f"job finished {time.monotonic() - killed:.1f} s after the kill; lost 0, "
              f"counted twice 0, stuck 0; {rerun} request(s) started again on the new primary")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_every_connection_has_timeouts_keepalive_and_health_checks():
    """Built, never connected: the connections to the sentinels (ours, kombu's and the result
    backend's) and the result backend's own carry a read and a connect timeout, TCP keepalive
    and health checks, so a frozen sentinel or Redis host raises within seconds."""
    from worker.ops.redisconn import CONNECT_TIMEOUT_S, HEALTH_CHECK_S, SOCKET_TIMEOUT_S, connect
    from worker.ops.settings import Settings
    from worker.queue.app import make_app, transport_options

    url = f"sentinel://:{PASSWORD}@127.0.0.1:1;sentinel://127.0.0.1:2/0"
    settings = Settings(broker_url=url)
    want = {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_keepalive": True,
            "health_check_interval": HEALTH_CHECK_S}

    def sentinel_connections(sentinel) -> list[dict]:
        return [node.connection_pool.connection_kwargs for node in sentinel.sentinels]

    client = connect(url, settings)
    backend = make_app(settings).backend
    for kwargs in (*sentinel_connections(client.connection_pool.sentinel_manager),
                   *sentinel_connections(backend._get_sentinel_instance(**backend.connparams)),
                   transport_options(settings)["sentinel_kwargs"]):  # what kombu gives Sentinel
        assert want.items() <= kwargs.items() and kwargs["socket_timeout"] == CONNECT_TIMEOUT_S
        assert kwargs["password"] == PASSWORD
    want["socket_timeout"] = SOCKET_TIMEOUT_S
    assert want.items() <= client.connection_pool.connection_kwargs.items()
    assert want.items() <= backend.connparams.items()
    plain = make_app(Settings(broker_url="redis://127.0.0.1:1/0")).backend.connparams
    assert want.items() <= plain.items()


@pytest.mark.process
def test_a_primary_refusing_writes_is_a_503(tmp_path):
    """A primary without an in-sync replica (``min-replicas-to-write``) answers NOREPLICAS:
    the gateway says 503 and retry, not 500."""
    from fastapi.testclient import TestClient

    from worker.api import create_app
    from worker.ops.settings import Settings

    port = free_port()
    server = start_redis(tmp_path, "lonely", [f"port {port}", f"requirepass {PASSWORD}",
                                              "min-replicas-to-write 1"])
    try:
        url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
        wait_ping(redis.Redis.from_url(url))
        app = create_app(Settings(broker_url=url, files_url=str(tmp_path / "files")))
        with TestClient(app, raise_server_exceptions=False) as http:
            r = http.post("/v1/generations", json={"prompt": "x"})
            assert r.status_code == 503 and r.json()["code"] == "unavailable", r.text
    finally:
        server.kill()
        server.wait()


def test_sentinel_and_data_nodes_over_tls(tmp_path, start_worker, tiny_model_dir):
    """Sentinels and the primary on TLS ports only: client, worker (Celery and kombu
    included) find the primary through the sentinels and verify every certificate."""
    from worker.client import GenerationClient
    from worker.ops.settings import Settings

    ca, cert, key = make_certs(tmp_path)
    tls = [f'tls-cert-file "{cert}"', f'tls-key-file "{key}"', f'tls-ca-cert-file "{ca}"',
           "tls-auth-clients no", "tls-replication yes", "port 0"]
    primary_port, sentinel_port = free_port(), free_port()
    procs = [start_redis(tmp_path, "tls-primary", [f"tls-port {primary_port}", *tls,
                                                   f"requirepass {PASSWORD}"]),
             start_redis(tmp_path, "tls-sentinel", [
                 f"tls-port {sentinel_port}", *tls, "sentinel resolve-hostnames no",
                 f"sentinel monitor mymaster 127.0.0.1 {primary_port} 1",
                 f"sentinel auth-pass mymaster {PASSWORD}", f"requirepass {PASSWORD}"],
                 sentinel=True)]
    try:
        url = f"sentinel://:{PASSWORD}@127.0.0.1:{sentinel_port}/0"
        settings = Settings(broker_url=url, redis_sentinel_tls=True, redis_ca_file=ca)
        client = GenerationClient(settings=settings)
        wait_ping(client.store.redis, 30)
        rid = client.submit(prompt="sentinel over TLS", max_new_tokens=3)
        start_worker(GENQ_MODEL=str(tiny_model_dir), GENQ_BROKER_URL=url,
                     GENQ_REDIS_SENTINEL_TLS="1", GENQ_REDIS_CA_FILE=str(ca), wait_ready=False)
        assert client.wait(rid, timeout=120)["status"] == "succeeded"
        log = (start_worker.log_dir / "w1@test.log").read_text()
        assert "insecure" not in log and "No master found" not in log
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
