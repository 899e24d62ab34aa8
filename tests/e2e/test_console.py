"""The console in a real Chromium (Debian's `chromium`, driven by Playwright from PyPI with
``executable_path``; Playwright's own browser downloads are never used), against a real control plane
and real agents: sign in, the fleet on the overview, a CLI rotation watched live to "served by all",
a node revoked from the page stops its agent, a wrong token refused, a scoped token confined to its
prefix, and no secret value in any page. Screenshots for the README: run with VAULT_EDGE_SCREENSHOTS=docs/img..

The browser is installed when missing (apt-get, as root); under CI=true a missing browser fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI
from tests.e2e.conftest import ControlPlane, wait_until

CHROMIUM = "/usr/bin/chromium"
# The README's screenshots are refreshed on demand (VAULT_EDGE_SCREENSHOTS=docs/img): a plain run
# writes them to a temp dir, so `make test` leaves the working tree as it found it.
SHOTS = Path(os.environ.get("VAULT_EDGE_SCREENSHOTS") or tempfile.mkdtemp(prefix="ve-shots-"))
pytestmark = pytest.mark.e2e


def _install_chromium() -> str | None:
    """Install Debian's chromium and chromium-driver if missing; None if it is there, else why not."""
    if Path(CHROMIUM).exists():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{CHROMIUM} is missing and apt-get cannot run here (not root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        if r.returncode != 0:
            return f"{' '.join(cmd)} failed: {r.stderr[-500:]}"
    return None if Path(CHROMIUM).exists() else f"{CHROMIUM} still missing after apt-get install"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    problem = _install_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        problem = problem or f"playwright is not installed: {exc}"
    if problem:
        if IN_CI:
            pytest.fail(f"the console's browser tests need Chromium and Playwright under CI=true: {problem}")
        pytest.skip(problem)
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        yield b
        b.close()


def _cli(cp: ControlPlane, *args: str, stdin: str | None = None, token: str | None = None) -> str:
    env = {**os.environ, "VAULT_EDGE_ADDR": cp.addr, "VAULT_EDGE_TOKEN": token or cp.token}
    r = subprocess.run(
        [sys.executable, "-m", "vault_edge", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def _sign_in(page: Any, cp: ControlPlane, token: str) -> Any:
    page.goto(f"{cp.addr}/ui")
    assert page.url.endswith("/ui/signin")
    page.fill("#token", token)
    with page.expect_navigation():
        page.click("#signin")
    return page


def _no_value(page: Any, values: list[str]) -> None:
    html = page.content()
    for v in values:
        assert v not in html, f"a secret value in {page.url}"


@pytest.mark.timeout(1200)  # the first run may install Chromium
def test_console_in_a_real_browser(browser: Any, control_plane: ControlPlane, start_agent: Any) -> None:
    from playwright.sync_api import expect

    cp, op = control_plane, control_plane.op
    values = ["sk-live-first-4c1d9e", "sk-live-second-a07f3b", "team-a-only-5e2d"]
    op.put("openai/api-key", value=values[0], regions=["eu", "us"])
    op.put("svc/hmac", generate="32:base64url", regions=["eu"], rotate_every="30d")
    op.put("team-a/db-password", value=values[2], regions=["eu"])
    values.append(op.get("svc/hmac")["value"])
    agents = {name: start_agent(name, region) for name, region in (("eu1", "eu"), ("eu2", "eu"), ("us1", "us"))}
    ids = {name: a.node_id for name, a in agents.items()}

    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    # a CSP violation or a script error is logged as a console error (a 401 or 404 answer is not one)
    page.on(
        "console",
        lambda m: (
            errors.append(m.text) if m.type == "error" and not m.text.startswith("Failed to load resource") else None
        ),
    )
    page.on("pageerror", lambda e: errors.append(str(e)))

    # a wrong token is refused
    page.goto(f"{cp.addr}/ui/signin")
    page.fill("#token", "vet_" + "A" * 43)
    with page.expect_response(lambda r: r.url.endswith("/ui/signin") and r.request.method == "POST") as resp:
        page.click("#signin")
    assert resp.value.status == 401
    expect(page.locator("#signin-error")).to_contain_text("refused")

    # sign in: the overview shows the seeded regions and the agents, all ok
    _sign_in(page, cp, cp.token)
    expect(page.locator("#count-ok")).to_have_text("3 ok")
    for region in ("eu", "us"):
        expect(page.locator(f"#regions tr[data-region={region}]")).to_be_visible()
    for node_id in ids.values():
        expect(page.locator("#regions")).to_contain_text(node_id)

    # a rotation from the CLI, watched live: us1 is paused, so the page shows it lagging, then served by all
    page.goto(f"{cp.addr}/ui/secrets/openai/api-key")
    expect(page.locator("#summary")).to_contain_text("v1 served by all 3 live nodes")
    expect(page.locator("#live-dot")).to_have_class("live-dot on")
    page.evaluate("window.__noReload = 'still here'")
    paused = agents["us1"].proc
    assert paused is not None
    paused.send_signal(signal.SIGSTOP)
    try:
        _cli(cp, "rotate", "openai/api-key", "-", stdin=values[1] + "\n")
        expect(page.locator("#summary")).to_contain_text("v2 served by 2 of 3 live nodes")
        for name in ("eu1", "eu2"):
            expect(page.locator(f".pop[data-node={ids[name]}] .pop-version")).to_have_text("v2")
        expect(page.locator(f".pop[data-node={ids['us1']}]")).to_have_class("pop lagging")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "console-rotation.png"), full_page=True)
    finally:
        paused.send_signal(signal.SIGCONT)
    expect(page.locator("#summary")).to_contain_text("v2 served by all 3 live nodes")
    expect(page.locator(f".pop[data-node={ids['us1']}] .pop-version")).to_have_text("v2")
    assert page.evaluate("window.__noReload") == "still here"  # no reload: the events did it
    page.goto(f"{cp.addr}/ui")
    expect(page.locator("#rotation-list")).to_contain_text("openai/api-key")
    page.screenshot(path=str(SHOTS / "console-overview.png"), full_page=True)

    # no secret value in the HTML of any page
    for path in (
        "/ui",
        "/ui/regions",
        "/ui/secrets",
        "/ui/secrets/openai/api-key",
        "/ui/secrets/svc/hmac",
        "/ui/audit",
        "/ui/tokens",
        "/ui/rotate/svc/hmac",
    ):
        page.goto(cp.addr + path)
        _no_value(page, [*values, cp.token])

    # the audit page filters, and shows the chain's state
    page.goto(f"{cp.addr}/ui/audit?action=secret.rotate&target=openai")
    expect(page.locator("#verify")).to_contain_text("Chain intact")
    expect(page.locator("#audit tbody tr")).to_have_count(1)

    # revoke a node from the page (with its confirmation): its agent wipes itself and stops
    page.goto(f"{cp.addr}/ui/regions")
    page.click(f"#revoke-{ids['eu2']}")
    expect(page.locator("h1")).to_contain_text(f"Revoke node {ids['eu2']}")
    with page.expect_navigation():
        page.click("#confirm")
    expect(page.locator("#done")).to_have_text("Node revoked")
    wait_until(
        lambda: agents["eu2"].proc is not None and agents["eu2"].proc.poll() is not None,
        30,
        "the revoked agent to exit",
    )
    assert agents["eu2"].proc.returncode == 3
    assert any(
        e["action"] == "node.revoke" and e["target"] == ids["eu2"] and e["actor"].startswith("token:root/")
        for e in op.audit(limit=1000)["entries"]
    )
    page.goto(f"{cp.addr}/ui")
    expect(page.locator("#count-revoked")).to_have_text("1 revoked")

    # sign out: the page goes back to sign-in, and the console is closed to this browser
    page.click("header .signout button")
    page.wait_for_url("**/ui/signin")
    page.goto(f"{cp.addr}/ui/secrets")
    assert page.url.endswith("/ui/signin")
    assert not errors, errors  # no CSP violation, no script error
    ctx.close()

    # a scoped token sees only its prefix
    scoped = op.create_token(name="team-a", prefixes=["team-a/"], verbs=["list", "write"])["token"]
    ctx = browser.new_context()
    page = ctx.new_page()
    page.set_default_timeout(20_000)
    _sign_in(page, cp, scoped)
    expect(page.locator("nav")).not_to_contain_text("Regions")
    page.goto(f"{cp.addr}/ui/secrets")
    expect(page.locator("#secrets")).to_contain_text("team-a/db-password")
    expect(page.locator("#secrets")).not_to_contain_text("openai/api-key")
    _no_value(page, [*values, scoped])
    response = page.goto(f"{cp.addr}/ui/regions")
    assert response is not None and response.status == 403
    response = page.goto(f"{cp.addr}/ui/secrets/openai/api-key")
    assert response is not None and response.status == 403
    ctx.close()
