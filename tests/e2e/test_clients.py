"""The Python clients (``vault_edge/client.py``), blocking and asyncio, against a real agent process on
its real unix socket: every method, every error, the same answers from both, and the value types the
JavaScript client has (``value`` the text, ``bytes`` the exact bytes)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import AgentProcess, ControlPlane
from vault_edge import wire
from vault_edge.client import AgentClient, AgentError, AsyncAgentClient, Secret

pytestmark = pytest.mark.e2e
BINARY = bytes(range(256))


@pytest.fixture
def agent(control_plane: ControlPlane, start_agent: Any) -> AgentProcess:
    op = control_plane.op
    op.put("app/key", value="sk-one", regions=["eu"])
    op.rotate("app/key", value="sk-two")
    op.put("app/bin", value_b64=wire.b64e(BINARY), regions=["eu"])
    op.put("db/main", value=json.dumps({"user": "app", "password": "pw-1"}), regions=["eu"])
    op.put("us/only", value="elsewhere", regions=["us"])
    return start_agent("eu1", "eu")


def test_the_async_client_reads_what_the_agent_serves(agent: AgentProcess) -> None:
    async def go() -> None:
        async with AsyncAgentClient(str(agent.socket)) as c:
            s = await c.get("app/key")
            assert (s.name, s.value, s.bytes, s.text, s.version, s.stage) == (
                "app/key",
                "sk-two",
                b"sk-two",
                "sk-two",
                2,
                "current",
            )
            assert s.revision > 0 and s.age is not None and s.age >= 0
            assert "sk-two" not in repr(s)  # the repr leaves the value out
            assert (await c.get("app/key", stage="previous")).value == "sk-one"
            assert (await c.get("app/key", version=1)).value == "sk-one"
            assert (await c.get("db/main", field="password")).value == "pw-1"

            binary = await c.get("app/bin")
            assert binary.bytes == BINARY
            with pytest.raises(AgentError) as e:
                _ = binary.value
            assert e.value.code == "binary_value" and e.value.status == 0

            many = await c.get_many(["app/key", "db/main", "app/bin"])
            assert sorted(many) == ["app/bin", "app/key", "db/main"]
            assert many["app/key"].value == "sk-two" and many["app/bin"].bytes == BINARY
            assert len({m.revision for m in many.values()}) == 1  # one revision for the batch

            assert sorted(await c.names()) == ["app/bin", "app/key", "db/main"]
            health = await c.health()
            assert health["status"] == "ok" and health["region"] == "eu" and health["secrets"] == 3

            # Concurrent calls on one client (its connection pool), all answered.
            got = await asyncio.gather(*(c.get("app/key") for _ in range(20)))
            assert {g.value for g in got} == {"sk-two"}

    asyncio.run(go())


def test_the_async_client_watches_a_rotation_arrive(control_plane: ControlPlane, agent: AgentProcess) -> None:
    async def go() -> None:
        async with AsyncAgentClient(str(agent.socket)) as c:
            held = (await c.health())["revision"]
            quiet = await c.watch(held, wait=0.5)  # nothing changes: answered after the wait
            assert quiet["changed"] is False and quiet["revision"] == held
            watch = asyncio.create_task(c.watch(held, wait=20))
            await asyncio.sleep(0.2)
            await asyncio.to_thread(control_plane.op.rotate, "app/key", value="sk-three")
            woke = await asyncio.wait_for(watch, 25)
            assert woke["changed"] is True and woke["revision"] > held
            assert (await c.get("app/key")).value == "sk-three"

    asyncio.run(go())


def test_the_async_client_raises_the_agents_errors(agent: AgentProcess, workdir: Path) -> None:
    async def error(coro: Any) -> AgentError:
        with pytest.raises(AgentError) as e:
            await coro
        return e.value

    async def go() -> None:
        async with AsyncAgentClient(str(agent.socket)) as c:
            missing = await error(c.get("no/such"))
            assert (missing.status, missing.code) == (404, "not_found")
            foreign = await error(c.get("us/only"))  # held by the control plane, never by this region
            assert (foreign.status, foreign.code) == (404, "not_found")
            batch = await error(c.get_many(["app/key", "no/such"]))  # all or nothing
            assert batch.status == 404
            for bad in ("../etc/passwd", "a/./b", ""):
                refused = await error(c.get(bad))
                assert (refused.status, refused.code) == (400, "bad_request")
            no_field = await error(c.get("app/key", field="password"))  # not a structured value
            assert no_field.status == 400
            bad_stage = await error(c.get("app/key", stage="nope"))
            assert bad_stage.status == 400
        async with AsyncAgentClient(str(agent.socket), token="not-a-token-the-policy-knows") as c:
            forbidden = await error(c.get("app/key"))
            assert (forbidden.status, forbidden.code) == (403, "forbidden")
        async with AsyncAgentClient(str(workdir / "nobody.sock"), timeout=1) as c:
            gone = await error(c.health())
            assert (gone.status, gone.code) == (0, "unreachable") and "nobody.sock" in gone.message

    asyncio.run(go())


def test_both_clients_give_the_same_answers(agent: AgentProcess) -> None:
    def fields(s: Secret) -> tuple[Any, ...]:
        return (s.name, s.bytes, s.version, s.stage, s.revision)

    async def read_async() -> tuple[Any, ...]:
        async with AsyncAgentClient(str(agent.socket)) as c:
            return (
                fields(await c.get("app/key")),
                {k: fields(v) for k, v in (await c.get_many(["app/key", "app/bin"])).items()},
                sorted(await c.names()),
            )

    with AgentClient(str(agent.socket)) as c:
        blocking = (
            fields(c.get("app/key")),
            {k: fields(v) for k, v in c.get_many(["app/key", "app/bin"]).items()},
            sorted(c.names()),
        )
        assert c.get("app/key").value == "sk-two" and c.get("app/bin").bytes == BINARY
    assert asyncio.run(read_async()) == blocking


def test_the_public_client_api_is_documented() -> None:
    """Issue 13: docstrings on the public client API, both clients, the Secret and the error."""
    import inspect

    import vault_edge.client as client

    public = [client.AgentClient, client.AsyncAgentClient, client.Secret, client.AgentError, client.socket_path]
    missing = [obj.__qualname__ for obj in public if not inspect.getdoc(obj)]
    for cls in public[:3]:
        for name, member in vars(cls).items():
            if not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, property)):
                doc = member.__doc__
                if not doc or not doc.strip():
                    missing.append(f"{cls.__qualname__}.{name}")
    assert missing == []
    assert {"get", "get_many", "names", "health", "watch"} <= set(vars(client.AsyncAgentClient))
