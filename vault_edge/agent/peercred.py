"""Who is on the other end of a unix socket, as the kernel says (never as the caller says).

SO_PEERCRED gives the pid, uid and gid the peer had when it called ``connect()``; they are read once,
when the connection is accepted. The executable path comes from ``/proc/<pid>/exe`` and is read only
when the policy has a rule on it. A pid can be reused once its process has died, so the path is
taken under a pidfd where the kernel offers one (SO_PEERPIDFD, Linux 6.5+): the pidfd names the very
process that connected, and if it is still alive after the readlink, the pid was not reused in
between. Without SO_PEERPIDFD the same check is made against a pidfd opened just before the
readlink, which narrows the window but cannot close it; the path is then as good as the pid.
A peer in another pid namespace has pid 0 here and no path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Final, Protocol, overload

_CRED: Final = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
SO_PEERPIDFD: Final = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5; Python 3.11 lacks the constant


class SocketLike(Protocol):
    """A socket, or the wrappers event loops hand out (asyncio's TransportSocket, uvloop's)."""

    @property
    def family(self) -> int: ...

    @overload
    def getsockopt(self, level: int, option: int, /) -> int: ...
    @overload
    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Caller:
    """The peer of one connection. ``exe`` is None when not asked for, or not knowable."""

    pid: int
    uid: int
    gid: int
    exe: str | None = None


def peer_of(sock: SocketLike, *, with_exe: bool = False) -> Caller:
    """The kernel's credentials of ``sock``'s peer (a connected AF_UNIX stream socket).

    Raises OSError when the kernel gives none (not a unix socket, or not Linux).
    """
    if sys.platform != "linux":
        raise OSError("SO_PEERCRED is only available on Linux")
    if sock.family != socket.AF_UNIX:  # TCP would answer too, with pid 0 and uid -1
        raise OSError("kernel credentials exist only for unix sockets")
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    exe = exe_of(sock, pid) if with_exe and pid > 0 else None
    return Caller(pid=pid, uid=uid, gid=gid, exe=exe)


def exe_of(sock: SocketLike, pid: int) -> str | None:
    """The resolved executable path of the peer process ``pid``, or None if it cannot be trusted."""
    pidfd = _peer_pidfd(sock, pid)
    if pidfd is None:
        return None
    try:
        path = os.readlink(f"/proc/{pid}/exe")
        signal.pidfd_send_signal(pidfd, 0)  # still the same, living process: the path was its own
    except OSError:
        return None
    finally:
        os.close(pidfd)
    return path


def _peer_pidfd(sock: SocketLike, pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    with contextlib.suppress(OSError, AttributeError):
        return os.pidfd_open(pid)
    return None
