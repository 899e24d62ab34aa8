"""Real services whose passwords are really checked, for the rotation tests.

The PostgreSQL on 127.0.0.1:5432 trusts every local connection, so a login there proves nothing
about a password: these tests start their own throwaway cluster (Debian's ``initdb``/``pg_ctl``,
``--auth=scram-sha-256``, a free port, a temp dir; run as the ``postgres`` OS user when we are root,
since initdb refuses root). Redis: a throwaway ``redis-server`` on a free port with ACL users
(nothing shared with the machine's Redis). MariaDB: the machine's, at 127.0.0.1:3306 (root without a
password), with users of a random name made and dropped per test; it checks passwords for them.

Missing binaries skip the tests, or fail them under CI=true naming the Debian package to install.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from typing import Any

import pytest

from tests.conftest import IN_CI, free_port


def _missing(what: str) -> None:
    msg = f"{what} is not on this machine"
    if IN_CI:
        pytest.fail(msg + " (required under CI=true)")
    pytest.skip(msg)


class ThrowawayPostgres:
    """A PostgreSQL cluster of its own with scram-sha-256 authentication; superuser ``admin``."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
        if not bins:
            _missing("PostgreSQL's initdb (Debian package postgresql)")
        self.bin = os.path.dirname(bins[-1])
        self.port = free_port()
        self.admin_password = secrets.token_urlsafe(18)
        self.dir = tempfile.mkdtemp(prefix="ve-pg-")
        self.data = os.path.join(self.dir, "data")
        pwfile = os.path.join(self.dir, "pw")
        with open(pwfile, "w") as f:
            f.write(self.admin_password + "\n")
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            f"{self.bin}/initdb",
            "-D",
            self.data,
            "-U",
            "admin",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--no-sync",
        )
        os.unlink(pwfile)
        self._run(
            f"{self.bin}/pg_ctl",
            "-D",
            self.data,
            "-l",
            os.path.join(self.dir, "log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200 -c shared_buffers=16MB",
            "start",
        )

    def _run(self, *args: str) -> None:
        cmd = ["runuser", "-u", "postgres", "--", *args] if self._as_postgres else list(args)
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def admin(self) -> dict[str, Any]:
        return {"username": "admin", "password": self.admin_password}

    def connect(self, user: str = "admin", password: str | None = None) -> Any:
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            dbname="postgres",
            user=user,
            password=self.admin_password if password is None else password,
            connect_timeout=5,
            autocommit=True,
        )

    def can_login(self, user: str, password: str) -> bool:
        import psycopg

        try:
            with self.connect(user, password) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        try:
            self._run(f"{self.bin}/pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class ThrowawayRedis:
    """A redis-server of its own (nothing on disk), with an ACL user ``admin`` and ``default`` off."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            _missing("redis-server (Debian package redis-server)")
        self.port = free_port()
        self.admin_password = secrets.token_urlsafe(18)
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                r = redis.Redis(port=self.port)
                r.execute_command("ACL", "SETUSER", "admin", "on", ">" + self.admin_password, "~*", "&*", "+@all")
                r.execute_command("ACL", "SETUSER", "default", "off")
                r.close()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def admin(self) -> dict[str, Any]:
        return {"username": "admin", "password": self.admin_password}

    def client(self, user: str = "admin", password: str | None = None) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(
            port=self.port,
            username=user,
            retry=Retry(NoBackoff(), 0),
            password=self.admin_password if password is None else password,
            socket_timeout=5,
        )

    def can_login(self, user: str, password: str) -> bool:
        import redis

        try:
            c = self.client(user, password)
            try:
                return bool(c.ping())
            finally:
                c.close()
        except redis.AuthenticationError:
            return False

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}


def mysql_root() -> Any:
    import pymysql

    try:
        return pymysql.connect(connect_timeout=3, autocommit=True, **MYSQL)
    except pymysql.MySQLError as exc:
        _missing(f"MariaDB at 127.0.0.1:3306 with root and no password ({exc})")


def mysql_can_login(user: str, password: str) -> bool:
    import pymysql

    try:
        pymysql.connect(host="127.0.0.1", port=3306, user=user, password=password, connect_timeout=3).close()
        return True
    except pymysql.MySQLError:
        return False
