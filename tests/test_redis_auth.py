"""A password-protected Redis (a real ``redis-server --requirepass``): the door, keys, limits, audit and the whole
pipeline work through a URL with the password, nothing works without it, and the password is never printed."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import uuid

import pytest
import redis
from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.pipeline.runtime import start_controller, stop_controller
from shared.settings import Settings, redacted_url
from tests.pipeline_helpers import Probe, admin_key, pipeline_settings, tiny_requests
from tests.redis_servers import start_redis, stop_redis

PASSWORD = "pw-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def locked_redis():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    proc = start_redis(["--port", str(port), "--requirepass", PASSWORD], url)
    yield url, port
    stop_redis(proc)


def test_the_door_keys_and_limits_work_with_the_password(locked_redis, tmp_path) -> None:
    url, port = locked_redis
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(f"redis://127.0.0.1:{port}/0").set("x", 1)  # the server really is locked
    settings = Settings(redis_url=url, namespace=f"t-{uuid.uuid4().hex[:8]}", home=tmp_path, rate_limit="50/second")
    headers = {"Authorization": f"Bearer {admin_key(settings, 'ops')}"}
    with TestClient(create_app(settings), headers=headers) as c:
        health = c.get("/healthz")  # Redis answers (with the password); no controller runs in this test
        assert health.status_code == 503 and "controller absent" in health.text
        edit = {"edit_id": "locked-1", "subject": "Acme Corp", "prompt": "The CEO of {} is", "target_new": "Jane"}
        assert c.post("/v1/edits", json=edit).status_code == 202
        assert c.get("/v1/edits/locked-1").json()["state"] == "queued"
        assert [e["action"] for e in c.get("/v1/audit").json()] == ["key_created", "submit"]
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings)
    assert redacted_url(url) == f"redis://***@127.0.0.1:{port}/0"
    wrong = Settings(redis_url=f"redis://:nope-{PASSWORD}@127.0.0.1:{port}/0", namespace="x", home=tmp_path)
    with pytest.raises(redis.AuthenticationError) as refused, TestClient(create_app(wrong)):
        pass  # the API refuses to start on a wrong password, and says so without the password
    assert PASSWORD not in str(refused.value)


def test_the_cli_never_prints_the_password(locked_redis, tmp_path) -> None:
    url, port = locked_redis
    env = {**os.environ, "EDITQ_REDIS_URL": url, "EDITQ_NAMESPACE": f"t-{uuid.uuid4().hex[:8]}",
           "EDITQ_HOME": str(tmp_path)}
    cli = [sys.executable, "-m", "controller.cli.main"]
    made = subprocess.run([*cli, "keys", "create", "feed", "--scope", "edits:write"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0 and "eq_" in made.stdout and PASSWORD not in made.stdout + made.stderr
    listed = subprocess.run([*cli, "keys", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert "feed" in listed.stdout
    bad_pw = "wrong-" + secrets.token_hex(4)
    env["EDITQ_REDIS_URL"] = f"redis://:{bad_pw}@127.0.0.1:{port}/0"
    failed = subprocess.run([*cli, "submit", "-"], env=env, input='{"subject": "Acme Corp", "prompt": "{} is", '
                            '"target_new": "big"}\n', capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and bad_pw not in failed.stdout + failed.stderr


def test_the_pipeline_runs_end_to_end_on_a_locked_redis(ray_session, locked_redis, tiny_model_dir, tmp_path) -> None:
    url, _ = locked_redis
    settings = pipeline_settings(tmp_path, tiny_model_dir, url)
    probe = Probe(settings)
    requests = tiny_requests(4)
    headers = {"Authorization": f"Bearer {admin_key(settings, 'upstream')}"}
    with TestClient(create_app(settings), headers=headers) as c:
        for r in requests:
            assert c.post("/v1/edits", json=r.model_dump(mode="json")).status_code == 202
    actor, run_ref = start_controller(settings)
    try:
        states = probe.wait_terminal([r.edit_id for r in requests])
    finally:
        stop_controller(actor, run_ref)
    assert set(states.values()) == {"applied"} and probe.head() >= 1


def _self_signed(tmp_path):
    """A CA and a server certificate for 127.0.0.1 (cryptography), as PEM files."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def cert(subject, issuer, key, signer, ca: bool, san=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "editq test CA")])
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    ca = cert(ca_name, ca_name, ca_key, ca_key, True)
    server = cert(server_name, ca_name, server_key, ca_key, False, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return paths


def test_the_door_works_over_tls_with_a_verified_certificate(tmp_path) -> None:
    paths = _self_signed(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={paths['ca']}"
    proc = start_redis(["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(paths["cert"]),
                        "--tls-key-file", str(paths["key"]), "--tls-ca-cert-file", str(paths["ca"]),
                        "--tls-auth-clients", "no", "--requirepass", PASSWORD], url)
    try:
        with pytest.raises(redis.ConnectionError):  # plain text to a TLS port: refused
            redis.Redis.from_url(f"redis://:{PASSWORD}@127.0.0.1:{port}/0", socket_timeout=2).ping()
        settings = Settings(redis_url=url, namespace=f"t-{uuid.uuid4().hex[:8]}", home=tmp_path, metrics_public=True)
        headers = {"Authorization": f"Bearer {admin_key(settings, 'ops')}"}
        with TestClient(create_app(settings), headers=headers) as c:
            edit = {"edit_id": "tls-1", "subject": "Acme Corp", "prompt": "The CEO of {} is", "target_new": "Jane"}
            assert c.post("/v1/edits", json=edit).status_code == 202  # the queue, the limiter, the audit: over TLS
            assert c.get("/v1/edits/tls-1").json()["state"] == "queued"
            assert "editq_queue_lag_entries 1.0" in c.get("/metrics").text  # the sync scrape-time client too
        assert PASSWORD not in redacted_url(url) and str(paths["ca"]) not in redacted_url(url)
    finally:
        stop_redis(proc)
