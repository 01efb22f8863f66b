"""Who may use the HTTP API, on a real Redis and the real app: keys, scopes, identity, limits, revocation, OIDC and
the audit trail they leave."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from controller.api.app import create_app
from controller.security.keys import KeyStore, Scope
from shared.settings import Settings

EDIT = {"subject": "Acme Corp", "prompt": "The CEO of {} is", "target_new": "Jane Doe"}


def _settings(redis_url, tmp_path, **overrides) -> Settings:
    return Settings(redis_url=redis_url, namespace=f"test-{uuid.uuid4().hex[:10]}", home=tmp_path, **overrides)


def _key(settings: Settings, name: str, scopes: list[Scope], rate_limit: str | None = None) -> tuple[str, str]:
    async def go():
        redis = AsyncRedis.from_url(settings.redis_url, decode_responses=True)
        try:
            secret, key = await KeyStore(redis, settings.namespace).create(name, scopes, "tests", rate_limit)
            return secret, key.key_id
        finally:
            await redis.aclose()

    return asyncio.run(go())


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def app_settings(redis_url, tmp_path):
    settings = _settings(redis_url, tmp_path)
    yield settings
    r = Redis.from_url(redis_url)
    for key in r.scan_iter(match="{" + settings.namespace + "}:*"):
        r.delete(key)


def _probe(client: TestClient, method: str, path: str, headers: dict[str, str] | None = None):
    path = path.replace("{edit_id}", "x")
    if method == "POST":
        return client.post(path, json=EDIT if path == "/v1/edits" else {}, headers=headers or {})
    return client.get(path, headers=headers or {})


def test_every_route_but_healthz_needs_a_key(app_settings) -> None:
    app = create_app(app_settings)
    routes = [(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods]
    assert len(routes) >= 9
    with TestClient(app) as c:
        for method, path in routes:
            response = _probe(c, method, path)
            if path == "/healthz":  # open; 503 here because no controller runs in this test
                assert response.status_code == 503 and "controller absent" in response.text
            else:
                assert response.status_code == 401, (method, path, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
        wrong = _probe(c, "GET", "/v1/queue", _bearer("eq_deadbeef_not-a-real-key"))
        assert wrong.status_code == 401 and "unknown or revoked" in wrong.text
        assert _probe(c, "GET", "/v1/queue", {"Authorization": "Basic dXNlcjpwYXNz"}).status_code == 401


def test_scopes_are_enforced(app_settings) -> None:
    reader, _ = _key(app_settings, "dashboard", [Scope.edits_read])
    writer, _ = _key(app_settings, "upstream", [Scope.edits_write])
    with TestClient(create_app(app_settings)) as c:
        denied = c.post("/v1/edits", json=EDIT, headers=_bearer(reader))
        assert denied.status_code == 403 and "edits:write" in denied.text
        assert c.get("/v1/queue", headers=_bearer(reader)).json()["length"] == 0
        assert c.post("/v1/edits", json=EDIT, headers=_bearer(writer)).status_code == 202
        assert c.get("/v1/queue", headers=_bearer(writer)).status_code == 403
        for path in ("/v1/audit", "/metrics"):
            assert c.get(path, headers=_bearer(writer)).status_code == 403
            assert c.get(path, headers=_bearer(reader)).status_code == 403
        assert c.post("/v1/admin/pause", headers=_bearer(reader)).status_code == 403


def test_source_comes_from_the_key_and_the_audit_names_it(app_settings) -> None:
    writer, writer_id = _key(app_settings, "billing-sync", [Scope.edits_write, Scope.edits_read])
    admin, admin_id = _key(app_settings, "ops", [Scope.admin])
    with TestClient(create_app(app_settings)) as c:
        answer = c.post("/v1/edits", json={**EDIT, "edit_id": "e-1", "source": "someone-else"},
                        headers=_bearer(writer))
        assert answer.status_code == 202
        stored = Redis.from_url(app_settings.redis_url, decode_responses=True).hget(
            "{" + app_settings.namespace + "}:edit:e-1", "request")
        assert json.loads(stored)["source"] == "billing-sync"
        audit = c.get("/v1/audit", headers=_bearer(admin)).json()
        submits = [e for e in audit if e["action"] == "submit"]
        # the audit names the key too (several keys may share a name); the edit's source is the name
        assert [(e["principal"], e["edit_id"]) for e in submits] == [(f"billing-sync#{writer_id}", "e-1")]
        created = [e for e in audit if e["action"] == "key_created"]
        assert len(created) == 2 and all(e["principal"] == "tests" for e in created)
        assert c.post("/v1/admin/pause", params={"reason": "incident 42"}, headers=_bearer(admin)).json()["paused"]
        assert c.get("/v1/queue", headers=_bearer(admin)).json()["paused"] is True
        last = c.get("/v1/audit", params={"newest_first": True, "count": 1}, headers=_bearer(admin)).json()[0]
        assert last["action"] == "paused" and last["principal"] == f"ops#{admin_id}" and last["detail"] == "incident 42"


def test_rate_limit_answers_429_with_retry_after(app_settings) -> None:
    limited, _ = _key(app_settings, "noisy", [Scope.edits_read], rate_limit="3/minute")
    other, _ = _key(app_settings, "quiet", [Scope.edits_read])
    with TestClient(create_app(app_settings)) as c:
        codes = [c.get("/v1/queue", headers=_bearer(limited)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        over = c.get("/v1/queue", headers=_bearer(limited))
        assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
        assert c.get("/v1/queue", headers=_bearer(other)).status_code == 200  # limits are per key


def test_edit_quota_counts_every_item_and_stores_nothing_over_it(redis_url, tmp_path) -> None:
    settings = _settings(redis_url, tmp_path, edit_quota="5/day")
    writer, _ = _key(settings, "batcher", [Scope.edits_write, Scope.edits_read])
    edits = [{**EDIT, "target_new": f"Person {i}"} for i in range(6)]
    with TestClient(create_app(settings)) as c:
        over = c.post("/v1/edits", json=edits, headers=_bearer(writer))
        assert over.status_code == 429 and "edit quota" in over.text
        assert c.get("/v1/queue", headers=_bearer(writer)).json()["length"] == 0
        assert c.post("/v1/edits", json=edits[:5], headers=_bearer(writer)).status_code == 202
        assert c.post("/v1/edits", json=edits[5], headers=_bearer(writer)).status_code == 429


def test_revoked_key_stops_at_once_and_secrets_are_not_stored(app_settings) -> None:
    secret, key_id = _key(app_settings, "temp", [Scope.edits_read])
    admin, _ = _key(app_settings, "ops", [Scope.admin])
    with TestClient(create_app(app_settings)) as c:
        assert c.get("/v1/queue", headers=_bearer(secret)).status_code == 200

        async def revoke():
            redis = AsyncRedis.from_url(app_settings.redis_url, decode_responses=True)
            try:
                return await KeyStore(redis, app_settings.namespace).revoke(key_id, "cli:ops")
            finally:
                await redis.aclose()

        assert asyncio.run(revoke()).revoked_at is not None
        assert c.get("/v1/queue", headers=_bearer(secret)).status_code == 401
        revoked = c.get("/v1/audit", params={"action": "key_revoked"}, headers=_bearer(admin)).json()
        assert len(revoked) == 1 and revoked[0]["principal"] == "cli:ops" and key_id in revoked[0]["detail"]
    r = Redis.from_url(app_settings.redis_url, decode_responses=True)
    dump = " ".join(f"{k} {r.dump(k)!r}" for k in r.scan_iter(match="{" + app_settings.namespace + "}:*"))
    assert secret.split("_", 2)[2] not in dump and admin.split("_", 2)[2] not in dump  # eq_<id>_<secret>


def test_metrics_and_docs_follow_their_settings(redis_url, tmp_path) -> None:
    open_settings = _settings(redis_url, tmp_path, metrics_public=True, api_docs=False)
    with TestClient(create_app(open_settings)) as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/docs").status_code == 404 and c.get("/openapi.json").status_code == 404
    scraper_settings = _settings(redis_url, tmp_path)
    scraper, _ = _key(scraper_settings, "prometheus", [Scope.metrics])
    with TestClient(create_app(scraper_settings)) as c:
        assert "editq_queue" in c.get("/metrics", headers=_bearer(scraper)).text
        assert c.get("/openapi.json").status_code == 200


def test_oidc_tokens_from_a_jwks(redis_url, tmp_path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # the issuer's JWKS endpoint, over real HTTP
    threading.Thread(target=server.serve_forever, daemon=True).start()
    jwks_url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    settings = _settings(redis_url, tmp_path, oidc_jwks_url=jwks_url, oidc_issuer="https://sso.example",
                         oidc_audience="editq")

    def token(scope: str, **claims) -> str:
        body = {"sub": "alice@example.com", "iss": "https://sso.example", "aud": "editq", "scope": scope,
                "exp": int(time.time()) + 300, **claims}
        return jwt.encode(body, private, algorithm="RS256", headers={"kid": "k1"})

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"sub": "mallory", "iss": "https://sso.example", "aud": "editq", "scope": "admin",
                         "exp": int(time.time()) + 300}, other, algorithm="RS256", headers={"kid": "k1"})
    with TestClient(create_app(settings)) as c:
        assert c.get("/v1/queue", headers=_bearer(token("edits:read"))).status_code == 200
        assert c.post("/v1/edits", json=EDIT, headers=_bearer(token("edits:read"))).status_code == 403
        ok = c.post("/v1/edits", json={**EDIT, "edit_id": "sso-1"}, headers=_bearer(token("edits:write")))
        assert ok.status_code == 202
        for bad in (token("admin", exp=int(time.time()) - 10), token("admin", aud="other"),
                    token("admin", iss="https://evil.example"), forged):
            assert c.get("/v1/queue", headers=_bearer(bad)).status_code == 401
    server.shutdown()
    stored = Redis.from_url(redis_url, decode_responses=True).hget("{" + settings.namespace + "}:edit:sso-1", "request")
    assert json.loads(stored)["source"] == "oidc:alice@example.com"


def test_key_names_cannot_pose_as_other_principals(app_settings) -> None:
    for bad in ("oidc:alice", "cli:root", "controller", "API", "a b", ""):
        with pytest.raises(ValueError):
            _key(app_settings, bad, [Scope.admin])
    r = Redis.from_url(app_settings.redis_url)
    assert not r.exists("{" + app_settings.namespace + "}:apikeys")  # nothing stored for a refused name


def test_oidc_needs_issuer_and_audience() -> None:
    with pytest.raises(ValueError, match="EDITQ_OIDC_ISSUER"):
        Settings(oidc_jwks_url="https://sso.example/jwks.json")
