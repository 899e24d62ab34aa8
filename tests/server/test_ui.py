"""The console at /ui, in process: sessions, CSRF, headers, scopes, actions audited, no value in a page.
(The real-browser tests are tests/e2e/test_console.py.)"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Api
from vault_edge.server.ui import routes

VALUES = ("sk-live-VALUE-ONE-6b1f", "sk-live-VALUE-TWO-93ac", "team-a-VALUE-77d0")


@pytest.fixture
def console(sqlite_url: str) -> Iterator[tuple[Any, Api]]:
    from fastapi.testclient import TestClient

    from vault_edge.server.app import create_app
    from vault_edge.server.settings import Settings

    with TestClient(create_app(Settings(db=sqlite_url))) as client:
        doc = client.post("/v1/sys/init", json={"shares": 1, "threshold": 1}).json()
        client.post("/v1/sys/unseal", json={"share": doc["shares"][0]})
        api = Api(client, doc["root_token"])
        api.call("POST", "/v1/regions", json={"name": "eu"})
        api.call("PUT", "/v1/secrets/app/key", json={"value": VALUES[0], "regions": ["eu"]})
        api.call("POST", "/v1/rotate/app/key", json={"value": VALUES[1]})
        api.call("PUT", "/v1/secrets/team-a/db", json={"value": VALUES[2], "regions": ["eu"]})
        api.call("PUT", "/v1/secrets/gen/hmac", json={"generate": "24:alnum", "regions": ["eu"]})
        yield client, api


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html
    return m.group(1)


def sign_in(client: Any, token: str) -> Any:
    client.cookies.clear()
    pre = csrf_of(client.get("/ui/signin").text)
    return client.post("/ui/signin", data={"csrf": pre, "token": token}, follow_redirects=False)


def audit_actions(api: Api) -> list[tuple[str, str, str]]:
    return [(e["actor"], e["action"], e["outcome"]) for e in api.call("GET", "/v1/audit?limit=1000")[1]["entries"]]


PAGES = (
    "/ui",
    "/ui/regions",
    "/ui/secrets",
    "/ui/secrets?prefix=app",
    "/ui/secrets/app/key",
    "/ui/secrets/gen/hmac",
    "/ui/audit",
    "/ui/audit?actor=root&action=secret&target=app",
    "/ui/tokens",
    "/ui/rotate/gen/hmac",
    "/ui/nodes/n-0123456789abcdef/revoke",
)


def test_sign_in_every_page_has_the_headers_and_no_value(console: tuple[Any, Api]) -> None:
    client, api = console
    generated = api.call("GET", "/v1/secrets/gen/hmac")[1]["value"]
    r = sign_in(client, api.token)
    assert r.status_code == 303 and r.headers["location"] == "/ui"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert api.token not in cookie  # the session is a random id, not the token
    for path in (*PAGES, "/ui/signin", "/ui/static/console.js", "/ui/static/console.css"):
        r = client.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
        for value in (*VALUES, generated, api.token):
            assert value not in r.text, (path, "a secret value or the token in the page")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["cache-control"] == ("no-cache" if "/static/" in path else "no-store")
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "same-origin"  # no-referrer would make Chromium send Origin: null
        assert "<script>" not in r.text and " style=" not in r.text  # nothing inline for the CSP to allow
    root_id = api.call("GET", "/v1/tokens")[1]["tokens"][0]["id"]
    assert (f"token:root/{root_id}", "ui.signin", "ok") in audit_actions(api)


def test_a_wrong_token_is_refused_and_audited(console: tuple[Any, Api]) -> None:
    client, api = console
    r = sign_in(client, "vet_" + "x" * 43)
    assert r.status_code == 401 and "refused" in r.text
    assert "ve_session" not in r.headers.get("set-cookie", "")
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/signin"
    assert ("anonymous", "ui.signin", "refused") in audit_actions(api)


def test_forms_need_their_csrf_token_and_our_origin(console: tuple[Any, Api]) -> None:
    client, api = console
    pre = csrf_of(client.get("/ui/signin").text)
    assert client.post("/ui/signin", data={"token": api.token}).status_code == 403  # no CSRF token
    assert client.post("/ui/signin", data={"csrf": pre + "x", "token": api.token}).status_code == 403
    sign_in(client, api.token)
    csrf = csrf_of(client.get("/ui").text)
    before = api.call("GET", "/v1/history/gen/hmac")[1]["versions"]
    assert client.post("/ui/rotate/gen/hmac", data={"csrf": "forged"}).status_code == 403
    assert (
        client.post("/ui/rotate/gen/hmac", data={"csrf": csrf}, headers={"Origin": "https://evil.example"}).status_code
        == 403
    )
    assert (
        client.post("/ui/rotate/gen/hmac", data={"csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"}).status_code
        == 403
    )
    assert (
        client.post(
            "/ui/rotate/gen/hmac", content=b"csrf=" + csrf.encode(), headers={"Content-Type": "text/plain"}
        ).status_code
        == 415
    )
    assert api.call("GET", "/v1/history/gen/hmac")[1]["versions"] == before  # nothing changed


def test_rotate_from_the_console_is_generated_and_audited_like_the_api(console: tuple[Any, Api]) -> None:
    client, api = console
    sign_in(client, api.token)
    csrf = csrf_of(client.get("/ui/rotate/gen/hmac").text)
    r = client.post(
        "/ui/rotate/gen/hmac", data={"csrf": csrf, "generate": "", "value": "typed-in"}, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/secrets/gen/hmac"
    latest = api.call("GET", "/v1/secrets/gen/hmac")[1]
    assert latest["version"] == 2 and latest["value"] != "typed-in" and len(latest["value"]) == 24
    assert any(a == "secret.rotate" and actor.startswith("token:root/") for actor, a, _ in audit_actions(api))
    # a secret with no generate spec needs one; a bad spec is a 400 page, not a 500
    csrf = csrf_of(client.get("/ui").text)
    r = client.post("/ui/rotate/app/key", data={"csrf": csrf, "generate": "nonsense"})
    assert r.status_code == 400 and "<html" in r.text
    r = client.post("/ui/rotate/app/key", data={"csrf": csrf})
    assert r.status_code == 400 and "generate spec" in r.text


def test_sign_out_ends_the_session_even_for_a_copied_cookie(console: tuple[Any, Api]) -> None:
    client, api = console
    sign_in(client, api.token)
    session = client.cookies.get("ve_session")
    csrf = csrf_of(client.get("/ui").text)
    r = client.post("/ui/signout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/signin"
    client.cookies.set("ve_session", session, path="/ui")
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/signin"


def test_a_scoped_token_sees_only_its_prefix(console: tuple[Any, Api]) -> None:
    client, api = console
    scoped = api.call(
        "POST", "/v1/tokens", json={"name": "team-a", "prefixes": ["team-a/"], "verbs": ["list", "write"]}
    )[1]["token"]
    assert sign_in(client, scoped).status_code == 303
    page = client.get("/ui/secrets").text
    assert "team-a/db" in page and "app/key" not in page and "gen/hmac" not in page
    overview = client.get("/ui").text
    assert "app/key" not in overview and "/ui/regions" not in overview and "/ui/audit" not in overview
    assert client.get("/ui/secrets/team-a/db").status_code == 200
    for path in (
        "/ui/secrets/app/key",
        "/ui/regions",
        "/ui/audit",
        "/ui/rotate/app/key",
        "/ui/nodes/n-0123456789abcdef/revoke",
    ):
        assert client.get(path).status_code == 403, path
    assert any(
        a.startswith("ui.") and o == "refused" and actor.startswith("token:team-a/")
        for actor, a, o in audit_actions(api)
    )


def test_revoking_a_token_from_the_console_ends_its_sessions(console: tuple[Any, Api]) -> None:
    from fastapi.testclient import TestClient

    client, api = console
    made = api.call("POST", "/v1/tokens", json={"name": "ops", "prefixes": [""], "verbs": ["list"]})[1]
    other = TestClient(client.app)
    assert sign_in(other, made["token"]).status_code == 303
    assert other.get("/ui/secrets").status_code == 200
    sign_in(client, api.token)
    page = client.get(f"/ui/tokens/{made['id']}/revoke")
    assert page.status_code == 200 and "Revoke token" in page.text
    r = client.post(f"/ui/tokens/{made['id']}/revoke", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 200 and "revoked" in r.text
    assert other.get("/ui/secrets", follow_redirects=False).headers["location"] == "/ui/signin"
    assert any(a == "token.revoke" for _, a, _ in audit_actions(api))


def test_bad_input_is_a_4xx_page(console: tuple[Any, Api]) -> None:
    client, api = console
    sign_in(client, api.token)
    csrf = csrf_of(client.get("/ui").text)
    assert client.get("/ui/audit?since=yesterday").status_code == 400
    assert client.get("/ui/audit?before=-1").status_code == 400
    assert client.get("/ui/secrets/" + "x" * 600).status_code in (400, 404)
    assert client.get("/ui/secrets/no/such").status_code == 404
    assert client.get("/ui/static/../app.py").status_code == 404
    assert client.post("/ui/nodes/n-0123456789abcdef/revoke", data={"csrf": csrf}).status_code == 404
    assert client.post("/ui/nodes/..%2f/revoke", data={"csrf": csrf}).status_code == 404
    assert client.post(
        "/ui/rotate/gen/hmac", content=b"\xff\xfe", headers={"Content-Type": "application/x-www-form-urlencoded"}
    ).status_code in (400, 403)


def test_the_live_view_streams_the_propagation(console: tuple[Any, Api], monkeypatch: pytest.MonkeyPatch) -> None:
    client, api = console
    monkeypatch.setattr(routes, "STREAM_S", 0.6)
    sign_in(client, api.token)
    with client.stream("GET", "/ui/events/rotation/app/key") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    assert "event: rotation" in body and '"current":2' in body
    assert VALUES[0] not in body and VALUES[1] not in body
    client.cookies.clear()
    assert client.get("/ui/events/rotation/app/key", follow_redirects=False).status_code == 303


def test_a_seal_signs_everyone_out(console: tuple[Any, Api]) -> None:
    client, api = console
    sign_in(client, api.token)
    assert client.get("/ui").status_code == 200
    api.call("POST", "/v1/sys/seal")
    r = client.get("/ui")
    assert r.status_code == 503 and "sealed" in r.text
    assert len(client.app.state.ui_sessions) == 0


def test_rotating_a_rotator_kept_secret_runs_at_its_source_as_through_the_api(console: tuple[Any, Api]) -> None:
    """The console called the plain rotation: a random string became the current version of a
    credential kept at its source (a database's, a provider's), which the API refuses."""
    client, api = console
    url = "http://127.0.0.1:9"
    config = {
        "create": {"method": "POST", "url": url + "/keys"},
        "test": {"method": "GET", "url": url + "/whoami", "bearer_field": "key"},
        "revoke": {"method": "DELETE", "url": url + "/keys/{id}"},
    }
    rotator = {"type": "webhook", "admin_secret": "rotators/ai-admin", "admin_value": {"token": "t"}, "config": config}
    assert api.call("PUT", "/v1/rotators/ai", json=rotator)[0] == 200
    assert api.call("PUT", "/v1/secrets/ai/key", json={"rotator": "ai", "regions": ["eu"]})[0] == 200
    sign_in(client, api.token)
    page = client.get("/ui/rotate/ai/key").text
    assert "rotator <code>ai</code>" in page and 'name="generate"' not in page
    csrf = csrf_of(page)
    r = client.post("/ui/rotate/ai/key", data={"csrf": csrf, "generate": "32:base64url"}, follow_redirects=False)
    assert r.status_code == 409  # a spec for a rotator's secret: refused, as by the API
    r = client.post("/ui/rotate/ai/key", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303  # a rotation at the source, started
    assert [v["origin"] for v in api.call("GET", "/v1/history/ai/key")[1]["versions"]] != ["generated"]
    assert api.call("GET", "/v1/rotations/ai/key")[1]["rotations"], "a rotation at the source began"


def test_the_audit_page_takes_any_before_and_any_detail(console: tuple[Any, Api]) -> None:
    """'²' passed isdigit() (a 500); a detail column a database writer set to a list, or nested too
    deep, broke the page that exists to show such things (the column is outside the chain's MAC)."""
    from sqlalchemy import text

    client, api = console
    sign_in(client, api.token)
    assert client.get("/ui/audit?before=%C2%B2").status_code == 400
    for detail in ("[1]", "[" * 100_000 + "]" * 100_000):
        with client.app.state.ctx.store.engine.begin() as conn:
            conn.execute(text("UPDATE audit SET detail = :d"), {"d": detail})
        r = client.get("/ui/audit")
        assert r.status_code == 200 and "unreadable=True" in r.text


def test_a_live_view_left_open_keeps_no_session_alive(
    console: tuple[Any, Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The live view polls (and the browser reopens it) for as long as the tab is open: that is not
    someone using the console, and the session still ends after its idle time."""
    from vault_edge.server.ui.sessions import IDLE_S

    client, api = console
    now = [1_000_000.0]
    client.app.state.ui_sessions.clock = lambda: now[0]
    monkeypatch.setattr(routes, "STREAM_S", 0.1)
    sign_in(client, api.token)
    for _ in range(4):
        now[0] += IDLE_S / 3
        with client.stream("GET", "/ui/events/rotation/app/key") as r:
            "".join(r.iter_text())
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/signin"


def test_no_token_can_sign_everyone_else_out(console: tuple[Any, Api]) -> None:
    """Signing in over and over with any valid token (a list-only one, say) pushed every other session
    out of the bounded table: a token's own oldest sessions go first now."""
    from fastapi.testclient import TestClient

    from vault_edge.server.ui.sessions import MAX_PER_TOKEN

    client, api = console
    client.app.state.ui_sessions.max_sessions = MAX_PER_TOKEN + 4
    admin = TestClient(client.app)
    sign_in(admin, api.token)
    weak = api.call("POST", "/v1/tokens", json={"name": "w", "prefixes": ["team-a/"], "verbs": ["list"]})[1]["token"]
    for _ in range(3 * MAX_PER_TOKEN):
        assert sign_in(client, weak).status_code == 303
    assert admin.get("/ui", follow_redirects=False).status_code == 200
    assert client.get("/ui/secrets", follow_redirects=False).status_code == 200  # the newest still works
