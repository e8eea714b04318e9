"""Secrets stay out of sight: every URL form that carries a password is masked in the logs
(``worker.ops.logging``), and the embedded Redis gets its password from a private config file,
never from its command line."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.conftest import ROOT
from worker.ops.logging import LOG_VALUE_CHARS, mask_processor, mask_secrets
from worker.stack import EmbeddedRedis

PW = "hunter2-8d5e"

# (text with the password, what is left once it is masked)
FORMS = [
    (f"redis://:{PW}@redis.example:6379/0", "redis://:***@redis.example:6379/0"),
    (f"redis://genq:{PW}@10.0.0.5:6379/2", "redis://genq:***@10.0.0.5:6379/2"),
    (f"rediss://genq:{PW}@redis.example:6380/1?ssl_cert_reqs=required",
     "rediss://genq:***@redis.example:6380/1?ssl_cert_reqs=required"),
    (f"redis://redis.example:6379/0?password={PW}&socket_timeout=5",
     "redis://redis.example:6379/0?password=***&socket_timeout=5"),
    (f"redis://redis.example/0?db=1&sentinel_password={PW}",
     "redis://redis.example/0?db=1&sentinel_password=***"),
    (f"redis://redis.example/0?sentinel_kwargs=%7B%22password%22%3A+%22{PW}%22%7D",
     "redis://redis.example/0?sentinel_kwargs=***"),
    (f"sentinel://:{PW}@s1:26379;sentinel://:{PW}@s2:26379",
     "sentinel://:***@s1:26379;sentinel://:***@s2:26379"),
    (f"redis://:p@ss;{PW}@redis.example:6379/0 from gpu0@host",  # unencoded '@' and ';'
     "redis://:***@redis.example:6379/0 from gpu0@host"),
    (f"connecting with password={PW} to the broker", "connecting with password=*** to the broker"),
    (f"options {{'password': '{PW}', 'db': 0}}", "options {'password': '***', 'db': 0}"),
]


@pytest.mark.parametrize(("text", "masked"), FORMS)
def test_mask_secrets_hides_every_password_form_and_keeps_the_rest(text, masked):
    assert mask_secrets(text) == masked


@pytest.mark.parametrize("text", ["redis://127.0.0.1:6379/0", "redis://genq@redis.example/0",
                                  "rediss://redis.example:6380/0?ssl_cert_reqs=required",
                                  "worker gpu0@host started, queue genq.bulk"])
def test_mask_secrets_leaves_text_without_a_password_alone(text):
    assert mask_secrets(text) == text


def test_long_log_values_are_cut_whole_tokens_and_masked_in_one_read():
    """A poison message's 100 KB id or 17 MB body is logged cut, at a space (a password in
    the cut token never shows in part), without reading it once per character (the masking
    patterns used to take a minute on such a value, stalling the worker's Redis thread)."""
    import time

    secret = f"redis://:{PW}@redis.example:6379/0"
    pad = "x " * (LOG_VALUE_CHARS // 2 - 8)
    start = time.monotonic()
    out = mask_processor(None, "info", {
        "event": "message_rejected", "request_id": "x" * 100_000, "body": ["ab1." * 50_000],
        "reason": pad + secret + " and more", "exception": "Traceback " + "y" * 100_000 + " end",
        "options": {"url": secret}})
    assert time.monotonic() - start < 10  # quadratic took about 60 s; linear takes ms
    assert out["request_id"] == "[100000 characters cut]"
    assert out["body"] == ["[200000 characters cut]"]
    assert out["reason"].startswith(pad) and PW not in out["reason"]
    assert out["reason"].endswith(" characters cut]") and "redis://" not in out["reason"]
    assert out["exception"] == "[100010 characters cut] end"
    assert out["options"] == {"url": "redis://:***@redis.example:6379/0"}
    assert all(len(v) <= LOG_VALUE_CHARS + 40 for v in (out["request_id"], out["reason"]))


LOGGING_SCRIPT = f"""
import logging, structlog
from worker.ops.logging import configure_logging
configure_logging("INFO")
log = structlog.get_logger("genq")
log.info("broker_connect", url="redis://:{PW}@h:6379/0", options={{"result": "redis://h/0?password={PW}"}})
log.info("retrying rediss://genq:{PW}@h:6380/1 in 1 s")
logging.getLogger("celery").warning("Cannot connect to %s", "redis://:{PW}@h:6379/0")
try:
    raise ConnectionError("redis://h/0?sentinel_password={PW}")
except ConnectionError:
    log.exception("store_failed")
    logging.getLogger("kombu").exception("lost password={PW}")
"""


@pytest.mark.process
def test_log_lines_mask_passwords_in_urls_and_password_values():
    """Through structlog and through the standard library (Celery, kombu), exceptions too."""
    out = subprocess.run([sys.executable, "-c", LOGGING_SCRIPT], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert [line["event"] for line in lines] == [
        "broker_connect", "retrying rediss://genq:***@h:6380/1 in 1 s",
        "Cannot connect to redis://:***@h:6379/0", "store_failed", "lost password=***"]
    assert lines[0]["url"] == "redis://:***@h:6379/0"
    assert lines[0]["options"] == {"result": "redis://h/0?password=***"}
    assert "redis://h/0?sentinel_password=***" in lines[3]["exception"]
    assert "Traceback" in lines[4]["exception"] and "password=***" in lines[4]["exception"]
    assert PW not in out.stderr


@pytest.mark.process
def test_embedded_redis_takes_its_password_from_a_private_config_file(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        config = Path(redis.Redis.from_url(server.url).info("server")["config_file"])
        assert config == server.config
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
        assert f'requirepass "{server.password}"' in config.read_text().splitlines()
        assert stat.S_IMODE((server.dir / "password").stat().st_mode) == 0o600
        assert server.proc.args == [server.proc.args[0], str(config)]
        assert server.password.encode() not in Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()
        assert redis.Redis.from_url(server.url).config_get("appendonly") == {"appendonly": "yes"}
    finally:
        server.stop()
    assert not config.parent.exists()
    # a second start on the same directory reuses the password: queued data stays reachable
    again = EmbeddedRedis(tmp_path / "redis").start()
    try:
        assert again.password == server.password and again.config != config
    finally:
        again.stop()


@pytest.mark.process
def test_embedded_redis_in_a_directory_with_spaces_and_quotes(tmp_path):
    """The config file quotes its values: paths are not split or cut short."""
    server = EmbeddedRedis(tmp_path / 'my "data" dir' / "redis").start()
    try:
        assert redis.Redis.from_url(server.url).config_get("dir")["dir"] == str(server.dir)
    finally:
        server.stop()
    assert (server.dir / "redis.log").exists() and (server.dir / "appendonlydir").is_dir()
