"""Every route of the API × every role × no, garbage, expired and revoked tokens, through the real
server: the role matrix of docs/server.md, checked against what the server actually does."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

from tests.conftest import Cli
from tests.test_server import ADMIN_PASSWORD, launch

ADMIN, OPERATOR, RESTORE_ONLY, AUDITOR, PROXY = "admin", "operator", "restore-only", "auditor", "proxy"
PEOPLE = {ADMIN, OPERATOR, RESTORE_ONLY, AUDITOR}
EVERY_ROLE = PEOPLE | {PROXY}
CHANGE = {ADMIN, OPERATOR}
OPEN = None  # no token needed

# (method, path) → the roles that may call it: the documented matrix, written out by hand
MATRIX: dict[tuple[str, str], set[str] | None] = {
    ("GET", "/api/health"): OPEN,
    ("GET", "/metrics"): OPEN,
    ("POST", "/api/auth/login"): OPEN,
    ("POST", "/api/auth/logout"): EVERY_ROLE,
    ("GET", "/api/me"): EVERY_ROLE,
    ("POST", "/api/tokens"): EVERY_ROLE,
    ("GET", "/api/tokens"): EVERY_ROLE,
    ("DELETE", "/api/tokens/{token_id}"): EVERY_ROLE,
    ("GET", "/api/users"): {ADMIN},
    ("POST", "/api/users"): {ADMIN},
    ("DELETE", "/api/users/{name}"): {ADMIN},
    ("GET", "/api/audit"): {ADMIN, AUDITOR},
    ("GET", "/api/audit/verify"): {ADMIN, AUDITOR},
    ("GET", "/api/hypervisors"): PEOPLE,
    ("POST", "/api/hypervisors"): CHANGE,
    ("DELETE", "/api/hypervisors/{name}"): CHANGE,
    ("POST", "/api/hypervisors/{name}/discover"): CHANGE,
    ("PUT", "/api/hypervisors/{name}/restore-locations"): {ADMIN},
    ("GET", "/api/hypervisors/{name}/restore-choices"): {ADMIN, OPERATOR, RESTORE_ONLY},  # asks the hypervisor
    ("GET", "/api/vms"): PEOPLE,
    ("GET", "/api/repositories"): PEOPLE,
    ("POST", "/api/repositories"): CHANGE,
    ("POST", "/api/repositories/{name}/rebuild"): CHANGE,
    ("DELETE", "/api/repositories/{name}"): CHANGE,
    ("POST", "/api/repositories/{name}/verify"): CHANGE,
    ("POST", "/api/repositories/{name}/prune"): CHANGE,
    ("POST", "/api/repositories/{name}/gc"): CHANGE,
    ("POST", "/api/repositories/{name}/usage"): CHANGE,
    ("POST", "/api/repositories/{name}/copy"): CHANGE,
    ("GET", "/api/maintenance"): PEOPLE,
    ("GET", "/api/maintenance/{run_id}"): PEOPLE,
    ("GET", "/api/points"): PEOPLE,
    ("POST", "/api/proxies/register"): {ADMIN, PROXY},
    ("POST", "/api/proxies/{name}/heartbeat"): {ADMIN, PROXY},
    ("GET", "/api/proxies"): PEOPLE,
    ("DELETE", "/api/proxies/{name}"): {ADMIN},
    ("GET", "/api/policies"): PEOPLE,
    ("POST", "/api/policies"): CHANGE,
    ("PUT", "/api/policies/{name}"): CHANGE,
    ("DELETE", "/api/policies/{name}"): CHANGE,
    ("POST", "/api/policies/{name}/run"): CHANGE,
    ("GET", "/api/policies/{name}/replica"): PEOPLE,
    ("PUT", "/api/policies/{name}/replica"): CHANGE,
    ("GET", "/api/replicas"): PEOPLE,
    ("POST", "/api/replicas/{vm}/failover"): CHANGE,
    ("GET", "/api/jobs"): PEOPLE,
    ("GET", "/api/jobs/{job_id}"): PEOPLE,
    ("GET", "/api/jobs/{job_id}/log"): PEOPLE,
    ("POST", "/api/jobs/{job_id}/cancel"): CHANGE,
    ("POST", "/api/restores"): {ADMIN, OPERATOR, RESTORE_ONLY},
    ("GET", "/api/restores"): PEOPLE,
    ("GET", "/api/restores/{restore_id}"): PEOPLE,
    ("POST", "/api/restores/{restore_id}/finish"): {ADMIN, OPERATOR, RESTORE_ONLY},
    ("POST", "/api/restores/{restore_id}/discard"): {ADMIN, OPERATOR, RESTORE_ONLY},
    ("GET", "/api/points/{point}/files"): {ADMIN, OPERATOR, RESTORE_ONLY},  # a file is a restore
    ("GET", "/api/points/{point}/files/download"): {ADMIN, OPERATOR, RESTORE_ONLY},
    ("GET", "/api/points/{point}/files/search"): {ADMIN, OPERATOR, RESTORE_ONLY},
    ("DELETE", "/api/points/{point}/files"): {ADMIN, OPERATOR, RESTORE_ONLY},
    ("GET", "/api/vms/{vm}/files/search"): {ADMIN, OPERATOR, RESTORE_ONLY},
}


def _concrete(path: str) -> str:
    """A path with its parameters filled by values that name nothing (so nothing is changed)."""
    return re.sub(r"\{(\w+)\}", lambda m: "999999" if m.group(1).endswith("_id") else "no-such-thing", path)


def _call(client: httpx.Client, method: str, path: str) -> httpx.Response:
    body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
    return client.request(method, _concrete(path), **body)  # type: ignore[arg-type]


def test_every_route_every_role_every_token(cli: Cli, database: str, tmp_path: Path) -> None:
    with launch(cli, database, tmp_path) as server:
        routes = {(m.upper(), p) for p, ops in server.client().get("/openapi.json").json()["paths"].items()
                  for m in ops}
        assert routes == set(MATRIX), f"routes not in the matrix: {routes - set(MATRIX)}; " \
                                      f"gone: {set(MATRIX) - routes}"
        admin = server.client(server.login("admin", ADMIN_PASSWORD))
        tokens = {ADMIN: server.login("admin", ADMIN_PASSWORD)}
        for role in (OPERATOR, RESTORE_ONLY, AUDITOR, PROXY):
            name = role.replace("-", "")
            assert admin.post("/api/users", json={"name": name, "password": "matrix-password",
                                                  "role": role}).status_code == 201
            tokens[role] = server.login(name, "matrix-password")

        # tokens that must not work: garbage, not ours, expired, revoked, for a disabled account
        expired = server.client(tokens[OPERATOR]).post("/api/tokens", json={"name": "expired"}).json()["token"]
        revoked = server.client(tokens[OPERATOR]).post("/api/tokens", json={"name": "revoked"}).json()["token"]
        revoked_id = next(t["id"] for t in server.client(tokens[OPERATOR]).get("/api/tokens").json()
                          if t["name"] == "revoked")
        assert server.client(revoked).delete(f"/api/tokens/{revoked_id}").status_code == 204
        engine = create_engine(server.database)
        with engine.begin() as conn:
            conn.execute(text("UPDATE api_tokens SET expires = now() - interval '1 minute' WHERE name = 'expired'"))
        engine.dispose()
        bad = {"none": None, "garbage": "vk_" + "x" * 43, "not-vmkeep": "Zm9vOmJhcg==", "expired": expired,
               "revoked": revoked}

        for method, path in sorted(MATRIX):
            allowed = MATRIX[(method, path)]
            if allowed is OPEN:
                assert _call(server.client(), method, path).status_code not in (401, 403), path
                continue
            for label, token in bad.items():
                reply = _call(server.client(token), method, path)
                assert reply.status_code == 401, (label, method, path, reply.status_code, reply.text)
            for role, token in tokens.items():
                if (method, path) == ("POST", "/api/auth/logout"):  # ends the token: use one of its own
                    token = server.client(token).post("/api/tokens", json={"name": "spare"}).json()["token"]
                reply = _call(server.client(token), method, path)
                if role in allowed:
                    assert reply.status_code not in (401, 403), (role, method, path, reply.status_code, reply.text)
                else:
                    assert reply.status_code == 403, (role, method, path, reply.status_code, reply.text)
        # nothing the matrix sent changed the inventory
        assert admin.get("/api/hypervisors").json() == [] and admin.get("/api/policies").json() == []
        assert {u["name"] for u in admin.get("/api/users").json()} == {"admin", "operator", "restoreonly",
                                                                      "auditor", "proxy"}
