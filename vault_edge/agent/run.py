"""``vault-edge agent run``: wire the identity, the disk cache, the socket server and the sync loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
from dataclasses import dataclass, field
from pathlib import Path

from vault_edge.agent import identity as ident
from vault_edge.agent.api import Api
from vault_edge.agent.cache import DiskCache
from vault_edge.agent.egress import EgressSettings
from vault_edge.agent.endpoint import IDLE_TIMEOUT_S, MAX_CONNS_PER_UID, serve
from vault_edge.agent.policy import Policy
from vault_edge.agent.sync import ENROLL_TIMEOUT_S, EnrolError, Revoked, Syncer, load_cached
from vault_edge.agent.view import AgentState

log = logging.getLogger("vault_edge.agent")

EXIT_REVOKED = 3  # systemd: RestartPreventExitStatus=3


class StartError(Exception):
    """The agent cannot start or must stop; the message says why."""


@dataclass(frozen=True)
class AgentConfig:
    server: str | None
    state_dir: Path
    socket: Path
    join_token: str | None = None
    policy: Path | None = None
    max_stale: float | None = None
    stale_after: float = 75.0
    wait: float = 30.0
    socket_mode: int = 0o660
    tls_ca: str | None = None
    idle_timeout: float = IDLE_TIMEOUT_S
    max_conns_per_uid: int = MAX_CONNS_PER_UID
    enroll_timeout: float = ENROLL_TIMEOUT_S
    metrics_addr: tuple[str, int] | None = None  # (host, port) of the opt-in Prometheus endpoint
    metrics_token: str | None = None
    egress: EgressSettings = field(default_factory=EgressSettings)


def warn_about_policy(policy: Policy) -> None:
    """Warnings about a policy that may not mean what it seems to (logged at start)."""
    if policy.exe_only_rules:
        rules = ", ".join(f"rule {i}" for i in policy.exe_only_rules)
        log.warning(
            "policy %s: %s rel%s on exe alone; exe is advisory (read once per connection, a process can "
            "connect and then exec the allowed binary), not a security boundary: add a uid, gid or "
            "token_sha256 condition",
            policy.source or "",
            rules,
            "ies" if len(policy.exe_only_rules) == 1 else "y",
        )
    if policy.uses_exe and os.geteuid() != 0:
        log.warning(
            "the policy has exe conditions: the kernel lets an unprivileged agent read /proc/PID/exe only of "
            "callers running as its own uid, so exe rules for other uids never match (fail closed); run the "
            "agent as root or with CAP_SYS_PTRACE for them"
        )


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (idle clients cost a descriptor each); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d (%s)", soft, hard, exc)
    return soft


def clean_stale_temp_files(state_dir: Path) -> int:
    """Remove ``.*.tmp`` files a killed agent left mid-write in its state dir (never the files they
    were to replace: those are renamed over whole or not at all). The number removed."""
    removed = 0
    for tmp in Path(state_dir).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            tmp.unlink()
            removed += 1
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write in %s", removed, state_dir)
    return removed


def reload_policy(api: Api, path: Path | None) -> bool:
    """SIGHUP: read the policy file again and serve by it from the next request (cached answers are
    dropped: a new epoch). A file that does not load leaves the policy in force. True if reloaded."""
    if path is None:
        log.info("SIGHUP: no --policy file to reload (the agent's own uid and root may read everything)")
        return False
    try:
        policy = Policy.load(path)
    except (ValueError, OSError) as exc:
        log.error("SIGHUP: policy %s not reloaded, the one in force stays: %s", path, exc)
        return False
    warn_about_policy(policy)
    api.policy = policy
    api.refresh()
    log.info("SIGHUP: policy %s reloaded (%d rule(s))", path, len(policy.rules or ()))
    return True


async def run(cfg: AgentConfig) -> int:
    try:
        identity = ident.load_or_create(cfg.state_dir)
    except (ident.IdentityError, OSError) as exc:
        raise StartError(str(exc)) from None
    server = cfg.server or (identity.enrolment.server if identity.enrolment else None)
    if not server:
        raise StartError("give --server URL (the control plane)")
    if not identity.enrolled and not cfg.join_token:
        raise StartError("this node is not enrolled: give --join-token (from `vault-edge node token --region R`)")
    if identity.enrolled and cfg.join_token:
        log.warning("already enrolled as %s; ignoring --join-token", identity.enrolment.node)  # type: ignore[union-attr]
    try:
        policy = Policy.load(cfg.policy)
    except ValueError as exc:
        raise StartError(str(exc)) from None
    warn_about_policy(policy)
    nofile = raise_fd_limit()

    enrolment = identity.enrolment
    state = AgentState(
        enrolment.node if enrolment else "",
        enrolment.region if enrolment else "",
        max_stale=cfg.max_stale,
        stale_after=cfg.stale_after,
    )
    cache = DiskCache(cfg.state_dir)
    clean_stale_temp_files(cfg.state_dir)
    restored = load_cached(identity, state, cache)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def stopping() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):  # before serving: a SIGTERM from then on is graceful
        loop.add_signal_handler(sig, stopping)
    api = Api(state, policy, egress=cfg.egress)
    try:
        listener = await serve(
            str(cfg.socket),
            api,
            mode=cfg.socket_mode,
            idle_timeout=cfg.idle_timeout,
            max_conns_per_uid=cfg.max_conns_per_uid,
        )
    except (OSError, ValueError) as exc:
        raise StartError(f"cannot listen on {cfg.socket}: {getattr(exc, 'strerror', None) or exc}") from None
    log.info(
        "serving on %s (open-files limit %d, per-uid connection cap %d, idle connections closed after %gs)",
        cfg.socket,
        nofile,
        cfg.max_conns_per_uid,
        cfg.idle_timeout,
    )
    loop.add_signal_handler(signal.SIGHUP, reload_policy, api, cfg.policy)

    syncer = Syncer(
        identity,
        state,
        cache,
        server,
        join_token=cfg.join_token,
        wait=cfg.wait,
        ca_file=cfg.tls_ca,
        restored=restored,
        enroll_timeout=cfg.enroll_timeout,
        report=api.egress.report,
    )
    metrics_server = None
    if cfg.metrics_addr is not None:
        from vault_edge.agent.metrics import render, serve_metrics

        host, port = cfg.metrics_addr
        try:
            metrics_server = await serve_metrics(host, port, lambda: render(api, syncer, listener), cfg.metrics_token)
        except OSError as exc:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg.socket)
            await syncer.close()
            raise StartError(f"cannot listen for metrics on {host}:{port}: {exc.strerror or exc}") from None
        log.info(
            "metrics on http://%s:%d/metrics%s",
            host if ":" not in host else f"[{host}]",
            port,
            " (bearer token required)" if cfg.metrics_token else "",
        )
    sync_task = asyncio.create_task(syncer.run(), name="sync")
    code = 0
    try:
        done, _ = await asyncio.wait({sync_task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if sync_task in done:
            ended = sync_task.exception()
            if isinstance(ended, Revoked):
                log.error(
                    "this node was revoked by the control plane (%s): cache wiped; enrol again with a new join token",
                    ended,
                )
                ident.forget(cfg.state_dir)
                code = EXIT_REVOKED
            elif isinstance(ended, EnrolError):
                raise StartError(str(ended))
            elif ended is not None:
                raise ended
    finally:
        sync_task.cancel()
        with contextlib.suppress(BaseException):
            await sync_task
        listener.close()
        if metrics_server is not None:
            metrics_server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(listener.wait_closed(), 2)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cfg.socket)
        await syncer.close()
        with contextlib.suppress(Exception):
            await api.egress.aclose()
    return code


def main(cfg: AgentConfig) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(run(cfg))
    return uvloop.run(run(cfg))
