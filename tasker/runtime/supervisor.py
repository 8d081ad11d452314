"""The supervisor behind ``tasker worker``: N worker processes, restarted when they die.

Dramatiq's own CLI stops every worker process as soon as one dies (Dramatiq issue #376), so one
handler calling ``os._exit`` or one process killed by the OOM killer takes the whole worker down.
:class:`Supervisor` keeps its worker processes running instead:

* **Children.** Each child is a fresh interpreter running :mod:`tasker.runtime.worker_process`
  (one ``dramatiq.Worker`` with ``threads`` threads). Children are started from the main thread,
  because ``PR_SET_PDEATHSIG`` (the child's orphan protection) fires when the *thread* that started
  it ends, and with SIGTERM, SIGINT and SIGHUP blocked, so a stop request sent while a child is
  still booting waits for its handler instead of killing it.
* **One thread, one loop.** Signal handlers only record what was asked; the main loop, every
  :data:`POLL_S`, reaps children that exited, starts the ones that are due and forwards signals.
* **Restarts.** A child that exits while the supervisor is not stopping (any exit code, or killed
  by a signal) is logged and restarted after a :class:`Backoff` delay: 0.5 s, doubling up to 30 s
  while it keeps dying, back to 0.5 s once a child has run for 60 s. The exception is
  :data:`~tasker.runtime.worker_process.EXIT_CONFIG` (the modules cannot be imported): restarting
  cannot help, so the supervisor stops everything and exits with that code.
* **Signals.** The first SIGTERM or SIGINT stops restarting and sends SIGTERM to every child: a
  graceful stop. The second sends SIGTERM again: a forced stop, where each child releases the
  leases it holds and exits at once. Every child gets at most two SIGTERMs, one per loop turn, so
  two requests never merge into one. A child counts requests per sender, so a SIGTERM sent to the
  whole process group (``kill -- -PGID``, systemd) that reaches it directly and through this
  loop is still one graceful stop. SIGHUP restarts every child gracefully.
* **Exit code.** 0 when every child stopped cleanly, 1 when one failed while stopping. A child
  still running ``shutdown_timeout_s + SHUTDOWN_GRACE_S`` after the stop request is SIGKILLed.
* **Metrics and probes.** With ``metrics_port``, a thread serves ``/metrics`` (the children's
  metrics, in prometheus-client's multiprocess mode, plus the supervisor's own:
  :mod:`tasker.runtime.pod_metrics`), ``/health/live`` and ``/health/ready``
  (:mod:`tasker.runtime.pod_health`) from before the first child starts until the last one has
  exited. The children's metric and readiness files live in a private directory made at start
  and deleted at exit. That thread outlives the main one when the supervisor is SIGKILLed, so
  ``PR_SET_PDEATHSIG`` may reach a child twice; the child takes both as one stop request.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from tasker.health_http import HealthServer, listen_error
from tasker.readiness import read_statuses
from tasker.runtime.pod_health import LIVE_STALE_S, Check, ChildView, PodHealth
from tasker.runtime.pod_metrics import PodFiles, SupervisorMetrics, pod_registry
from tasker.runtime.worker_process import EXIT_CONFIG

__all__ = ["Backoff", "Child", "Supervisor", "WorkerOptions", "describe_exit", "supervise"]

logger = logging.getLogger("tasker.supervisor")

POLL_S = 0.2
SHUTDOWN_GRACE_S = 60.0  # after the shutdown timeout, before a child that is still there is killed
KILL_WAIT_S = 10.0  # after SIGKILL, how long to wait for the children before giving up
EXIT_FAILED = 1
HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_Popen = subprocess.Popen[bytes]


@dataclass(frozen=True)
class WorkerOptions:
    """What every worker process runs: the ``tasker worker`` options."""

    modules: list[str]
    processes: int = 1
    threads: int = 8
    queues: list[str] | None = None
    paths: list[str] = field(default_factory=list)
    shutdown_timeout_s: float = 600.0
    verbose: bool = False
    #: Serve /metrics, /health/live and /health/ready on this port (0: any free one; None: no).
    metrics_port: int | None = None

    def command(self, index: int, parent_pid: int, state_dir: str | None = None) -> list[str]:
        """The command line of worker process ``index``."""
        command = [sys.executable, "-m", "tasker.runtime.worker_process"]
        command += ["--worker-id", str(index), "--parent-pid", str(parent_pid)]
        if state_dir is not None:
            command += ["--state-dir", state_dir]
        command += ["--threads", str(self.threads)]
        command += ["--shutdown-timeout", str(self.shutdown_timeout_s)]
        for path in self.paths:
            command += ["--path", path]
        if self.queues:
            command += ["--queues", *self.queues]
        if self.verbose:
            command.append("--verbose")
        return [*command, "--", *self.modules]


@dataclass
class Backoff:
    """Restart delays of one child: ``initial_s`` doubling up to ``maximum_s``; back to
    ``initial_s`` when the child that died had run for ``reset_after_s``."""

    initial_s: float = 0.5
    maximum_s: float = 30.0
    reset_after_s: float = 60.0
    next_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.next_s = self.initial_s

    def delay(self, ran_for_s: float) -> float:
        """The delay before restarting a child that died after running ``ran_for_s``."""
        if ran_for_s >= self.reset_after_s:
            self.next_s = self.initial_s
        delay = self.next_s
        self.next_s = min(delay * 2, self.maximum_s)
        return delay


@dataclass
class Child:
    """One worker process slot: its current process, if any, and when to start the next one."""

    index: int
    backoff: Backoff
    proc: _Popen | None = None
    started_at: float = 0.0
    start_at: float | None = 0.0  # monotonic time to start a process; None: not scheduled
    terms_sent: int = 0
    killed: bool = False
    reloading: bool = False

    def alive(self) -> bool:
        """Whether its process runs (not yet reaped)."""
        return self.proc is not None and self.proc.poll() is None


def describe_exit(code: int) -> str:
    """``exited with exit code 3`` or ``was killed by SIGKILL`` (Popen's negative codes)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with exit code {code}"


class Supervisor:
    """Runs ``options.processes`` worker processes until SIGTERM/SIGINT; see the module doc."""

    def __init__(
        self,
        options: WorkerOptions,
        *,
        env: dict[str, str] | None = None,
        backoff: Callable[[], Backoff] = Backoff,
        checks: Sequence[Check] = (),
    ) -> None:
        self.options = options
        self.env = env
        self.children = [Child(i, backoff()) for i in range(options.processes)]
        #: Readiness checks of ``/health/ready``, beside the worker processes' own.
        self.checks = list(checks)
        #: Children restarted after they exited unasked.
        self.restarts = 0
        self.server: HealthServer | None = None
        self._files: PodFiles | None = None
        self._stop_requests = 0
        self._reload_requested = False
        self._fatal = False
        self._turned_at = time.monotonic()

    def run(self) -> int:
        """Supervise until stopped; returns the exit code for the ``tasker worker`` process.

        Raises :class:`~tasker.exceptions.ConfigurationError` before starting anything when it
        cannot listen on ``options.metrics_port``.
        """
        self._files = PodFiles()
        try:
            self.server = self._health_server(self._files)
            return self._supervise()
        finally:
            if self.server is not None:
                self.server.stop()
            self._files.close()

    def _supervise(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in HANDLED_SIGNALS}
        logger.info(
            "Supervising %d worker process(es) of %d thread(s) for %s (pid %d).",
            len(self.children),
            self.options.threads,
            ", ".join(self.options.modules),
            os.getpid(),
        )
        try:
            self._serve()
            logger.info("Stopping: no more restarts.")
            return self._shut_down()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self._stop_requests += 1

    # -- serving -------------------------------------------------------------------------------

    def _serve(self) -> None:
        while self._stop_requests == 0 and not self._fatal:
            self._turned_at = time.monotonic()
            if self._reload_requested:
                self._reload()
            for child in self.children:
                self._reap(child)
            self._start_due()
            time.sleep(POLL_S)

    def _reap(self, child: Child) -> None:
        """Schedule the restart of ``child`` if its process exited."""
        if child.proc is None or child.proc.poll() is None:
            return
        proc, child.proc = child.proc, None
        self._exited(proc)
        code = proc.returncode
        now = time.monotonic()
        if child.reloading:
            child.reloading = False
            child.start_at = now
            logger.info("Worker process %d (pid %d) stopped for the reload.", child.index, proc.pid)
        elif code == EXIT_CONFIG:
            logger.critical(
                "Worker process %d (pid %d) could not load its modules; stopping (exit code %d).",
                child.index,
                proc.pid,
                code,
            )
            self._fatal = True
        else:
            delay = child.backoff.delay(now - child.started_at)
            child.start_at = now + delay
            self.restarts += 1
            logger.error(
                "Worker process %d (pid %d) %s; restarting in %.1f s.",
                child.index,
                proc.pid,
                describe_exit(code),
                delay,
            )

    def _start_due(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is None and child.start_at is not None and now >= child.start_at:
                self._start(child)

    def _start(self, child: Child) -> None:
        """Start the process of ``child`` with the handled signals blocked (see the module doc)."""
        assert self._files is not None
        state_dir = str(self._files.state_dir)
        command = self.options.command(child.index, os.getpid(), state_dir)
        env = self._files.child_env(os.environ if self.env is None else self.env)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            child.proc = subprocess.Popen(command, env=env)
        except OSError:
            delay = child.backoff.delay(0.0)
            child.start_at = time.monotonic() + delay
            logger.exception(
                "Could not start worker process %d; retrying in %.1f s.", child.index, delay
            )
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        child.started_at = time.monotonic()
        child.start_at = None
        child.terms_sent = 0
        child.killed = False
        logger.info("Started worker process %d (pid %d).", child.index, child.proc.pid)

    def _reload(self) -> None:
        """SIGHUP: stop every child gracefully; each is started again as soon as it exited."""
        self._reload_requested = False
        logger.info("SIGHUP: restarting every worker process gracefully.")
        for child in self.children:
            if child.alive() and child.terms_sent == 0:
                child.reloading = True
                self._send(child, signal.SIGTERM, "graceful stop for the reload")
            elif child.proc is None:
                child.start_at = time.monotonic()

    # -- stopping ------------------------------------------------------------------------------

    def _shut_down(self) -> int:
        """Forward the stop requests until every child exited; returns the exit code."""
        kill_at = time.monotonic() + self.options.shutdown_timeout_s + SHUTDOWN_GRACE_S
        give_up_at = kill_at + KILL_WAIT_S
        failed = False
        while any(c.proc is not None for c in self.children) and time.monotonic() < give_up_at:
            self._turned_at = time.monotonic()
            level = min(max(self._stop_requests, 1), 2)
            for child in self.children:
                self._forward_stop(child, level, kill=time.monotonic() >= kill_at)
                failed = self._reap_stopped(child) or failed
            time.sleep(POLL_S)
        if any(c.proc is not None for c in self.children):
            logger.error("Gave up waiting for worker processes that would not exit.")
            failed = True
        if self._fatal:
            return EXIT_CONFIG
        logger.info("Every worker process stopped%s.", " (some failed)" if failed else "")
        return EXIT_FAILED if failed else 0

    def _forward_stop(self, child: Child, level: int, *, kill: bool) -> None:
        """Send ``child`` its next SIGTERM up to ``level`` (1 graceful, 2 forced), or SIGKILL."""
        if not child.alive() or child.killed:
            return
        if kill:
            child.killed = True
            self._send(child, signal.SIGKILL, "still running after the shutdown timeout")
        elif child.terms_sent < level:
            child.terms_sent += 1
            self._send(
                child, signal.SIGTERM, "graceful stop" if child.terms_sent == 1 else "forced"
            )

    def _reap_stopped(self, child: Child) -> bool:
        """Forget ``child``'s process if it exited; returns whether it failed."""
        if child.proc is None or child.proc.poll() is None:
            return False
        proc, child.proc = child.proc, None
        self._exited(proc)
        log = logger.info if proc.returncode == 0 else logger.warning
        log("Worker process %d (pid %d) %s.", child.index, proc.pid, describe_exit(proc.returncode))
        return proc.returncode != 0

    def _send(self, child: Child, signum: signal.Signals, why: str) -> None:
        assert child.proc is not None
        logger.info(
            "Sending %s to worker process %d (pid %d): %s.",
            signum.name,
            child.index,
            child.proc.pid,
            why,
        )
        child.proc.send_signal(signum)

    def _exited(self, proc: _Popen) -> None:
        assert self._files is not None
        self._files.process_exited(proc.pid)

    # -- metrics and probes --------------------------------------------------------------------

    def _health_server(self, files: PodFiles) -> HealthServer | None:
        port = self.options.metrics_port
        if port is None:
            return None
        registry = pod_registry(files, SupervisorMetrics(self._metrics_snapshot))
        try:
            server = HealthServer(registry, self.ready, live=self.live, port=port)
        except OSError as exc:
            raise listen_error(
                exc,
                port,
                who="tasker worker",
                fix="pass --metrics-port with a free port (0: any free one), or set "
                "worker.metrics_port (TASKER_WORKER__METRICS_PORT).",
            ) from None
        logger.info("Serving /metrics, /health/live and /health/ready on port %d.", server.port)
        return server.start()

    def health(self) -> PodHealth:
        """The pod's readiness now (see :mod:`tasker.runtime.pod_health`)."""
        views = []
        for child in self.children:
            proc = child.proc  # read once: the main loop may reap it meanwhile
            pid = None if proc is None else proc.pid
            views.append(ChildView(child.index, pid, child.terms_sent > 0 or child.reloading))
        stopping = None
        if self._fatal:
            stopping = "the supervisor gave up (a worker process could not load its modules)"
        elif self._stop_requests:
            stopping = "stopping (a stop request was received)"
        statuses = read_statuses(self._files.state_dir) if self._files is not None else {}
        return PodHealth.evaluate(views, statuses, stopping=stopping, checks=self.checks)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """``/health/ready``."""
        health = self.health()
        return health.ready, health.body()

    def live(self) -> tuple[bool, dict[str, Any]]:
        """``/health/live``: the supervisor's loop turned within :data:`LIVE_STALE_S`."""
        age = time.monotonic() - self._turned_at
        return age < LIVE_STALE_S, {"loop_age_s": round(age, 3)}

    def _metrics_snapshot(self) -> tuple[bool, Mapping[str, int], int]:
        health = self.health()
        by_state: dict[str, int] = {}
        for state in health.states.values():
            by_state[state] = by_state.get(state, 0) + 1
        return health.ready, by_state, self.restarts


def supervise(options: WorkerOptions, *, env: dict[str, str] | None = None) -> int:
    """Run a :class:`Supervisor` for ``options``; returns its exit code."""
    return Supervisor(options, env=env).run()
