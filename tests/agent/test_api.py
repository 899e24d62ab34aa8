"""The agent's socket API by calling it: ``Api(state, policy, clock).answer(request, caller)``.

No socket, no process, no sleep: time is a ``FakeClock`` the tests move. The transport (framing, the
per-connection cache, long-polls on a connection) is tested in ``test_endpoint``; the kernel's part
(peer credentials, socket files) in ``test_endpoint_process``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import Any

import pytest

from tests.agent.inproc import BINARY, ME, NODE, REGION, FakeClock, make_state, next_view
from tests.agent.support import NOBODY_ID, RawResponse
from vault_edge.agent.api import MAX_BATCH, Api
from vault_edge.agent.endpoint import Answer, Hold, Request
from vault_edge.agent.peercred import Caller
from vault_edge.agent.policy import Policy
from vault_edge.agent.view import AgentState

NOBODY = Caller(pid=1, uid=NOBODY_ID, gid=NOBODY_ID)


def parse(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    assert int(headers["content-length"]) == len(body)
    return RawResponse(int(lines[0].split(" ")[1]), headers, body)


def ask(
    api: Api,
    target: str,
    *,
    method: str = "GET",
    accept: str | None = None,
    token: str | None = None,
    caller: Caller = ME,
) -> RawResponse:
    """One request as the endpoint makes it: refresh once the clock passes ``until``, then answer."""
    if api.clock.monotonic() >= api.until:
        api.refresh()
    answer = api.answer(Request(method, target, accept, token, True, 0), caller)
    assert isinstance(answer, Answer)
    return parse(answer.data)


def error_of(r: RawResponse) -> tuple[int, str, str]:
    doc = r.json()["error"]
    return r.status, doc["code"], doc["message"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock: FakeClock) -> AgentState:
    return make_state(clock)


@pytest.fixture
def api(state: AgentState) -> Api:
    return Api(state, Policy(None))


# -- reads ------------------------------------------------------------------------------------------


def test_read_current_as_json(api: Api) -> None:
    r = ask(api, "/v1/secrets/db/main")
    assert r.status == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {
        "name": "db/main",
        "value": "hunter2",
        "encoding": "utf-8",
        "version": 3,
        "stage": "current",
        "revision": 1,
    }
    assert r.headers["x-vault-edge-revision"] == "1"
    assert r.headers["age"] == "0"
    assert r.headers["cache-control"] == "no-store"


def test_read_percent_encoded_name(api: Api) -> None:
    r = ask(api, "/v1/secrets/db%2Fmain")
    assert r.status == 200 and r.json()["value"] == "hunter2"


def test_utf8_value_is_text_and_binary_value_is_base64url(api: Api) -> None:
    assert ask(api, "/v1/secrets/openai").json()["value"] == "sk-ökö-✓"
    doc = ask(api, "/v1/secrets/bin").json()
    assert doc["encoding"] == "base64"
    assert "=" not in doc["value"]
    assert base64.urlsafe_b64decode(doc["value"] + "=" * (-len(doc["value"]) % 4)) == BINARY


def test_octet_stream_gives_the_raw_bytes(api: Api) -> None:
    r = ask(api, "/v1/secrets/bin", accept="application/octet-stream")
    assert r.status == 200
    assert r.body == BINARY
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-vault-edge-version"] == "1"
    assert r.headers["x-vault-edge-stage"] == "current"
    assert r.headers["x-vault-edge-revision"] == "1" and "age" in r.headers
    # JSON listed first wins; a plain */* client gets JSON
    assert ask(api, "/v1/secrets/bin", accept="application/json, application/octet-stream").json()["name"] == "bin"
    assert ask(api, "/v1/secrets/bin", accept="*/*").json()["name"] == "bin"
    assert ask(api, "/v1/secrets/bin", accept="text/plain;q=1, Application/Octet-Stream;q=0.5").body == BINARY


def test_read_by_version_and_stage(api: Api) -> None:
    assert ask(api, "/v1/secrets/db/main?version=2").json()["value"] == "hunter1"
    doc = ask(api, "/v1/secrets/db/main?stage=previous").json()
    assert (doc["value"], doc["version"], doc["stage"]) == ("hunter1", 2, "previous")
    assert ask(api, "/v1/secrets/db/main?version=3").json()["stage"] == "current"
    assert error_of(ask(api, "/v1/secrets/db/main?version=9"))[:2] == (404, "not_found")
    assert error_of(ask(api, "/v1/secrets/db/main?stage=pending"))[:2] == (404, "not_found")


def test_expired_previous_is_not_found(api: Api) -> None:
    assert ask(api, "/v1/secrets/old").json()["value"] == "fresh"
    assert error_of(ask(api, "/v1/secrets/old?stage=previous"))[:2] == (404, "not_found")
    assert error_of(ask(api, "/v1/secrets/old?version=1"))[:2] == (404, "not_found")


def test_grace_period_ends_on_the_wall_clock(clock: FakeClock) -> None:
    api = Api(
        make_state(
            clock,
            [
                {"name": "k", "version": 2, "stage": "current", "value": "new"},
                {"name": "k", "version": 1, "stage": "previous", "value": "old", "expires_in": 3},
            ],
        ),
        Policy(None),
    )
    answer = api.answer(Request("GET", "/v1/secrets/k?stage=previous", None, None, True, 0), ME)
    assert isinstance(answer, Answer) and not answer.cacheable  # its end is checked on every read
    clock.date += 2.999
    assert ask(api, "/v1/secrets/k?stage=previous").json()["value"] == "old"
    assert ask(api, "/v1/secrets?names=k&stage=previous").status == 200
    clock.date += 0.001
    assert error_of(ask(api, "/v1/secrets/k?stage=previous"))[:2] == (404, "not_found")
    assert error_of(ask(api, "/v1/secrets/k?version=1"))[:2] == (404, "not_found")
    assert ask(api, "/v1/secrets/k").json()["value"] == "new"


def test_answers_without_a_grace_period_are_cacheable_health_and_watch_are_not(api: Api) -> None:
    def answer(target: str) -> Answer | Hold:
        return api.answer(Request("GET", target, None, None, True, 0), ME)

    for target in (
        "/v1/secrets/db/main",
        "/v1/secrets/db/main?version=3",
        "/v1/secrets",
        "/v1/secrets?names=bin",
        "/v1/secrets/nope",
        "/v1/nope",
        "/v1/secrets/db/main?verison=1",
    ):
        a = answer(target)
        assert isinstance(a, Answer) and a.cacheable, target
    for target in ("/v1/secrets/db/main?stage=previous", "/v1/secrets?names=db/main&stage=previous", "/v1/health"):
        a = answer(target)
        assert isinstance(a, Answer) and not a.cacheable, target
    assert isinstance(answer("/v1/watch?wait=1"), Hold)


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("/v1/secrets/db/main?version=2&stage=previous", "not both"),
        ("/v1/secrets/db/main?version=abc", "version"),
        ("/v1/secrets/db/main?version=0", "version"),
        ("/v1/secrets/db/main?version=%C2%B2", "version"),  # a Unicode digit is not a version
        ("/v1/secrets/db/main?stage=future", "stage"),
        ("/v1/secrets/db/main?verison=2", "verison"),
        ("/v1/secrets/db/main?version=1&version=2", "twice"),
        ("/v1/secrets/..%2Fetc", "invalid secret name"),
        ("/v1/secrets/a//b", "invalid secret name"),
        ("/v1/secrets/%ff", "percent-encoding"),
        ("/v1/secrets/" + "a" * 300, "invalid secret name"),
        ("/v1/secrets?stage=previous", "stage"),
        ("/v1/health?x=1", "unknown query parameter"),
        ("/v1/watch?wait=soon", "wait"),
        ("/v1/watch?wait=-1", "wait"),
        ("/v1/watch?wait=nan", "wait"),
        ("/v1/watch?since=-1", "since"),
    ],
)
def test_bad_requests_are_400(api: Api, target: str, fragment: str) -> None:
    r = ask(api, target)
    assert r.status == 400, r.body
    assert r.json()["error"]["code"] == "bad_request"
    assert fragment in r.json()["error"]["message"]
    assert "connection" not in r.headers  # well framed: the connection stays open


def test_unknown_endpoint_is_404(api: Api) -> None:
    assert error_of(ask(api, "/v1/nope"))[:2] == (404, "not_found")
    assert error_of(ask(api, "/"))[:2] == (404, "not_found")


def test_non_get_is_405(api: Api) -> None:
    for method in ("POST", "PUT", "DELETE", "HEAD", "PATCH"):
        r = ask(api, "/v1/secrets/db/main", method=method)
        assert r.status == 405
        assert r.headers["allow"] == "GET"


# -- listing, batch ---------------------------------------------------------------------------------


def test_list_names(api: Api) -> None:
    r = ask(api, "/v1/secrets")
    assert r.status == 200
    assert r.json() == {"names": ["bin", "db/main", "old", "openai", "tenant-a/key", "tenant-b/key"]}
    assert r.headers["x-vault-edge-revision"] == "1"


def test_batch_read(api: Api) -> None:
    r = ask(api, "/v1/secrets?names=db/main,openai,bin")
    assert r.status == 200
    docs = r.json()["secrets"]
    assert [d["name"] for d in docs] == ["db/main", "openai", "bin"]
    assert docs[0]["value"] == "hunter2" and docs[2]["encoding"] == "base64"
    docs = ask(api, "/v1/secrets?names=db/main&stage=previous").json()["secrets"]
    assert docs[0]["value"] == "hunter1"


def test_batch_is_all_or_nothing_naming_the_first_failure(api: Api) -> None:
    status, code, message = error_of(ask(api, "/v1/secrets?names=db/main,nope,gone"))
    assert (status, code) == (404, "not_found") and "'nope'" in message
    assert error_of(ask(api, "/v1/secrets?names=db/main,bad..name/"))[:2] == (400, "bad_request")
    assert error_of(ask(api, "/v1/secrets?names=" + ",".join(["db/main"] * (MAX_BATCH + 1))))[:2] == (
        400,
        "bad_request",
    )
    assert ask(api, "/v1/secrets?names=" + ",".join(["db/main"] * MAX_BATCH)).status == 200


# -- health, staleness, readiness -------------------------------------------------------------------


def test_health(api: Api, clock: FakeClock) -> None:
    clock.advance(12.3456)
    doc = ask(api, "/v1/health").json()
    assert doc == {
        "status": "ok",
        "node": NODE,
        "region": REGION,
        "revision": 1,
        "last_sync_age_s": 12.346,
        "secrets": 6,
    }


def test_health_stale_when_control_plane_unreachable_and_reads_go_on(api: Api, state: AgentState) -> None:
    state.lost_contact()
    assert ask(api, "/v1/health").json()["status"] == "stale"
    assert ask(api, "/v1/secrets/db/main").status == 200  # stale still serves (no --max-stale)
    state.contact()
    assert ask(api, "/v1/health").json()["status"] == "ok"


def test_health_stale_after_stale_after_without_contact(api: Api, clock: FakeClock) -> None:
    clock.advance(75)
    assert ask(api, "/v1/health").json()["status"] == "ok"
    clock.advance(0.001)
    doc = ask(api, "/v1/health").json()
    assert doc["status"] == "stale" and doc["last_sync_age_s"] == 75.001
    assert ask(api, "/v1/secrets/db/main").headers["age"] == "75"


def test_starting_agent_answers_not_ready(clock: FakeClock) -> None:
    api = Api(make_state(clock, load=False, contact_age=None), Policy(None))
    assert ask(api, "/v1/health").json() == {
        "status": "starting",
        "node": NODE,
        "region": REGION,
        "revision": 0,
        "last_sync_age_s": None,
        "secrets": 0,
    }
    r = ask(api, "/v1/secrets/db/main")
    assert error_of(r)[:2] == (503, "not_ready")
    assert r.headers["retry-after"] == "1"
    assert error_of(ask(api, "/v1/secrets"))[:2] == (503, "not_ready")
    assert error_of(ask(api, "/v1/secrets?names=db/main"))[:2] == (503, "not_ready")


def test_never_contacted_serves_with_age_zero_and_says_stale(clock: FakeClock) -> None:
    api = Api(make_state(clock, contact_age=None), Policy(None))
    clock.advance(1000)
    r = ask(api, "/v1/secrets/db/main")
    assert r.status == 200 and r.headers["age"] == "0"
    doc = ask(api, "/v1/health").json()
    assert doc["status"] == "stale" and doc["last_sync_age_s"] is None


def test_age_counts_whole_seconds_since_contact(clock: FakeClock) -> None:
    state = make_state(clock, contact_age=5.25)
    api = Api(state, Policy(None))
    assert ask(api, "/v1/secrets/db/main").headers["age"] == "5"
    assert api.until == clock.now + 0.75  # answers are good until the integer Age ticks over
    clock.advance(0.7499)
    assert ask(api, "/v1/secrets/db/main").headers["age"] == "5"
    clock.advance(0.0001)
    assert ask(api, "/v1/secrets/db/main").headers["age"] == "6"
    clock.advance(3600)
    assert ask(api, "/v1/secrets/db/main").headers["age"] == "3606"
    state.contact()  # a contact resets it, and starts a new epoch at once (no clock needed)
    epoch = api.epoch
    state.contact()
    assert api.epoch == epoch + 1
    assert ask(api, "/v1/secrets/db/main").headers["age"] == "0"


def test_too_stale_refuses_reads_until_a_contact(clock: FakeClock) -> None:
    state = make_state(clock, max_stale=1.5)
    api = Api(state, Policy(None))
    assert ask(api, "/v1/secrets/db/main").status == 200
    clock.advance(1.5)
    assert ask(api, "/v1/secrets/db/main").status == 200  # --max-stale 1.5 means older than 1.5 s
    assert clock.now < api.until  # and the answer's epoch ends right after it
    clock.advance(1e-6)
    r = ask(api, "/v1/secrets/db/main")
    assert error_of(r)[:2] == (503, "too_stale") and r.headers["retry-after"] == "1"
    assert error_of(ask(api, "/v1/secrets"))[:2] == (503, "too_stale")
    assert error_of(ask(api, "/v1/secrets?names=db/main"))[:2] == (503, "too_stale")
    assert ask(api, "/v1/health").status == 200
    state.contact()
    assert ask(api, "/v1/secrets/db/main").status == 200


def test_a_new_view_starts_a_new_epoch_and_is_served(api: Api, state: AgentState) -> None:
    epoch = api.epoch
    state.install(next_view(state.view))
    assert api.epoch == epoch + 1
    r = ask(api, "/v1/secrets/db/main")
    assert r.headers["x-vault-edge-revision"] == "2"
    assert r.json() == {
        "name": "db/main",
        "value": "hunter2-r2",
        "encoding": "utf-8",
        "version": 4,
        "stage": "current",
        "revision": 2,
    }
    api.close()  # unsubscribed: the state no longer reaches it
    state.install(next_view(state.view))
    assert api.epoch == epoch + 1


# -- long-poll --------------------------------------------------------------------------------------


def watch(api: Api, target: str, during: Any = None) -> dict[str, Any]:
    hold = api.answer(Request("GET", target, None, None, True, 0), ME)
    assert isinstance(hold, Hold)

    async def go() -> bytes:
        if during is not None:
            asyncio.get_running_loop().call_later(0.01, during)
        return await hold.wait()

    r = parse(asyncio.run(go()))
    assert r.status == 200
    doc = r.json()
    assert r.headers["x-vault-edge-revision"] == str(doc["revision"])
    return doc  # type: ignore[no-any-return]


def test_watch_returns_when_the_revision_passes(api: Api, state: AgentState) -> None:
    install = lambda: state.install(next_view(state.view))  # noqa: E731
    assert watch(api, "/v1/watch?since=1&wait=30", during=install) == {"revision": 2, "changed": True}
    assert watch(api, "/v1/watch?wait=30", during=install) == {"revision": 3, "changed": True}  # since: held one
    assert watch(api, "/v1/watch?since=0&wait=30") == {"revision": 3, "changed": True}  # already past: at once


def test_watch_times_out_unchanged(api: Api, state: AgentState) -> None:
    assert watch(api, "/v1/watch?since=1&wait=0.02") == {"revision": 1, "changed": False}
    assert watch(api, "/v1/watch?wait=0") == {"revision": 1, "changed": False}
    # a contact is not a change
    assert watch(api, "/v1/watch?since=1&wait=0.05", during=state.contact) == {"revision": 1, "changed": False}


# -- policy: callers and tokens ---------------------------------------------------------------------


def uid_policy(tmp_path: Any) -> Policy:
    f = tmp_path / "policy.toml"
    f.write_text(
        f'[[rule]]\nuid = {os.getuid()}\nsecrets = ["db/*", "openai"]\n\n'
        f'[[rule]]\nuid = {NOBODY_ID}\nsecrets = ["tenant-b/*"]\n'
    )
    return Policy.load(f)


def test_policy_forbids_names_outside_the_rules(state: AgentState, tmp_path: Any) -> None:
    api = Api(state, uid_policy(tmp_path))
    assert ask(api, "/v1/secrets/db/main").status == 200
    status, code, message = error_of(ask(api, "/v1/secrets/bin"))
    assert (status, code) == (403, "forbidden") and "'bin'" in message
    # a forbidden name is forbidden whether or not it exists; an allowed absent one is not found
    assert error_of(ask(api, "/v1/secrets/no-such"))[:2] == (403, "forbidden")
    assert error_of(ask(api, "/v1/secrets/db/absent"))[:2] == (404, "not_found")
    assert ask(api, "/v1/secrets").json() == {"names": ["db/main", "openai"]}
    status, _, message = error_of(ask(api, "/v1/secrets?names=db/main,bin,nope"))
    assert status == 403 and "'bin'" in message


def test_forbidden_comes_before_not_ready_and_too_stale(clock: FakeClock, tmp_path: Any) -> None:
    policy = uid_policy(tmp_path)
    starting = Api(make_state(clock, load=False), policy)
    assert error_of(ask(starting, "/v1/secrets/bin"))[:2] == (403, "forbidden")
    assert error_of(ask(starting, "/v1/secrets/db/main"))[:2] == (503, "not_ready")
    stale = Api(make_state(clock, max_stale=1, contact_age=2), policy)
    assert error_of(ask(stale, "/v1/secrets/bin"))[:2] == (403, "forbidden")
    assert error_of(ask(stale, "/v1/secrets/db/main"))[:2] == (503, "too_stale")


def test_another_uid_without_a_policy_reads_nothing(api: Api) -> None:
    r = ask(api, "/v1/secrets/db/main", caller=NOBODY)
    assert error_of(r)[:2] == (403, "forbidden") and b"hunter2" not in r.body
    assert ask(api, "/v1/secrets", caller=NOBODY).json() == {"names": []}
    assert ask(api, "/v1/secrets/db/main", caller=Caller(pid=1, uid=0, gid=0)).status == 200  # root


def test_another_uid_reads_what_its_rule_allows(state: AgentState, tmp_path: Any) -> None:
    api = Api(state, uid_policy(tmp_path))
    assert ask(api, "/v1/secrets/tenant-b/key", caller=NOBODY).json()["value"] == "b-secret"
    assert ask(api, "/v1/secrets/db/main", caller=NOBODY).status == 403
    assert ask(api, "/v1/secrets", caller=NOBODY).json() == {"names": ["tenant-b/key"]}


TOKEN_A = "tok-A-0123456789abcdef0123456789abcdef012"


def test_token_rules(state: AgentState, tmp_path: Any) -> None:
    f = tmp_path / "policy.toml"
    f.write_text(
        f'[[rule]]\nuid = {os.getuid()}\nsecrets = ["*"]\n\n'
        f'[[rule]]\ntoken_sha256 = "{hashlib.sha256(TOKEN_A.encode()).hexdigest()}"\n'
        'secrets = ["tenant-a/*"]\n'
    )
    api = Api(state, Policy.load(f))
    assert ask(api, "/v1/secrets/tenant-a/key", token=TOKEN_A).json()["value"] == "a-secret"
    # a token request is judged by its token's rules only, not by the uid rule of the process
    assert error_of(ask(api, "/v1/secrets/tenant-b/key", token=TOKEN_A))[:2] == (403, "forbidden")
    assert ask(api, "/v1/secrets", token=TOKEN_A).json() == {"names": ["tenant-a/key"]}
    # an unknown token never falls back to kernel identity
    assert error_of(ask(api, "/v1/secrets/db/main", token="not-a-known-token"))[:2] == (403, "forbidden")
    assert error_of(ask(api, "/v1/secrets", token="not-a-known-token"))[:2] == (403, "forbidden")
    # without a token the uid rule applies
    assert ask(api, "/v1/secrets/tenant-b/key").status == 200
