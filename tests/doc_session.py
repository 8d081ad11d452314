"""What one document's examples share, in the document's order: a working directory, a migrated
database, one interpreter for its python blocks and the workers its background blocks start.

Every wait has a deadline; every process started here runs in a process group of its own and is
stopped by its own id.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg

from tests.doc_blocks import (
    Action,
    Block,
    DocsTestError,
    plan,
    python_file_path,
    shell_commands,
    shell_script,
)

__all__ = ["DocSession", "EarlierBlockFailedError", "run_bounded"]

ROOT = Path(__file__).resolve().parent.parent

#: Longest a block may run (a python block waiting for its workflow, a shell block).
BLOCK_TIMEOUT_S = 60.0
#: Longest a background worker may take to be ready, and to stop after SIGTERM.
WORKER_READY_S = 60.0
WORKER_STOP_S = 30.0
#: A background `tasker worker` runs one process, whatever the machine's CPU count.
WORKER_PROCESSES = ("-p", "1")
#: What a worker process logs once it consumes (tasker/runtime/worker_process.py).
WORKER_READY_LINE = "is ready"
#: What `tasker serve` prints once it listens (tasker/cli_serve.py), and the port the documents
#: show (api.port's default).
API_READY_LINE = "http://"
DOCUMENT_API_PORT = 8080


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Background:
    block: Block
    proc: subprocess.Popen[bytes]
    log: Path


class DocSession:
    """The shared state of one document's examples (see the module docstring)."""

    def __init__(self, path: str, blocks: list[Block], workdir: Path, database_url: str) -> None:
        self.path = path
        self.blocks = [b for b in blocks if _needs_session(b)]
        self.workdir = workdir
        self.database_url = database_url
        self.outcomes: dict[int, str | None] = {}  # block line -> None (passed) or its failure
        self._interpreter: subprocess.Popen[bytes] | None = None
        self._background: list[Background] = []
        self.api_port: int | None = None  # of the background `tasker serve`, once started

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of the examples: this checkout's code, the test settings and the
        document's database (no TASKER_* variable of the caller leaks in)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKER_")}
        paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env.update(
            PYTHONPATH=os.pathsep.join(paths),
            TASKER_ENV="test",
            TASKER_DATABASE__URL=self.database_url,
        )
        env.update(extra)
        return env

    # -- running blocks in order ---------------------------------------------------------------

    def run(self, block: Block) -> str | None:
        """Run the earlier blocks not run yet, then ``block``; its failure (None when it
        passed). Raises EarlierBlockFailedError when an earlier block failed."""
        for earlier in self.blocks:
            if earlier.line >= block.line:
                break
            if earlier.line not in self.outcomes:
                self._run_one(earlier)
            if self.outcomes[earlier.line] is not None:
                raise EarlierBlockFailedError(f"{earlier.where} failed, so this block cannot run")
        self._run_one(block)
        return self.outcomes[block.line]

    def _run_one(self, block: Block) -> None:
        runners = {
            Action.WRITE: self._write_file,
            Action.EXEC: self._exec_python,
            Action.SHELL: self._run_shell,
            Action.BACKGROUND: self._start_background,
            Action.SQL: self._run_sql,
        }
        try:
            runners[plan(block)](block)
        except (AssertionError, DocsTestError, OSError, SyntaxError, psycopg.Error) as exc:
            self.outcomes[block.line] = f"{block.where}: {exc}"
        else:
            self.outcomes[block.line] = None

    def _write_file(self, block: Block) -> None:
        relative = python_file_path(block)
        assert relative is not None
        compile("\n" * block.line + block.source, block.path, "exec")
        target = self.workdir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.source)

    def _exec_python(self, block: Block) -> None:
        interpreter = self._interpreter or self._start_interpreter()
        assert interpreter.stdin is not None and interpreter.stdout is not None
        request = {"path": block.path, "line": block.line, "source": block.source}
        interpreter.stdin.write(json.dumps(request).encode() + b"\n")
        interpreter.stdin.flush()
        answer = _read_answer(interpreter, interpreter.stdout, BLOCK_TIMEOUT_S)
        print(answer["output"], end="")
        assert answer["ok"], f"the block raised:\n{answer['error']}"

    def _start_interpreter(self) -> subprocess.Popen[bytes]:
        log = (self.workdir / "python-blocks.log").open("ab")
        self._interpreter = subprocess.Popen(
            [sys.executable, "-m", "tests.doc_runner"],
            cwd=self.workdir,
            env=self.env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        return self._interpreter

    def _run_shell(self, block: Block) -> None:
        for command in shell_commands(block):
            for target in command.redirections:
                (self.workdir / target).parent.mkdir(parents=True, exist_ok=True)
        tasker = shlex.join([sys.executable, "-m", "tasker.cli"])
        script = f'set -euo pipefail\ntasker() {{ {tasker} "$@"; }}\n'
        # the documents' API is http://127.0.0.1:8080; the test's listens on a free port
        port = self.api_port or DOCUMENT_API_PORT
        script += (
            "curl() { command curl --silent --show-error --fail-with-body --max-time 30 "
            f'"${{@//127.0.0.1:{DOCUMENT_API_PORT}/127.0.0.1:{port}}}"; }}\n'
        )
        script += shell_script(block)
        result = run_bounded(["bash", "-c", script], cwd=self.workdir, env=self.env())
        print(result.stdout, end="")
        assert result.returncode == 0, (
            f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
        if block.lang == "console":
            _compare_console_output(block, result.stdout)

    def _start_background(self, block: Block) -> None:
        (command,) = shell_commands(block)
        argv = [sys.executable, "-m", "tasker.cli", *command.program[1:]]
        extra = dict(command.assignments)
        ready_line = WORKER_READY_LINE
        if "serve" in command.program:  # the API, on a free port the shell blocks' curl uses
            self.api_port = _free_port()
            extra["TASKER_API__PORT"] = str(self.api_port)
            ready_line = API_READY_LINE
        else:
            argv += WORKER_PROCESSES
        log = self.workdir / f"background-{block.line}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=self.env(**extra),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_until_ready(proc, log, ready_line)
        except AssertionError:
            _stop(proc)
            raise
        self._background.append(Background(block, proc, log))

    def _run_sql(self, block: Block) -> None:
        with psycopg.connect(self.database_url) as conn:
            conn.execute(block.source)
            conn.rollback()

    # -- the end ---------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop the interpreter and the background workers, all at once; the failures: a worker
        that did not stop within WORKER_STOP_S of its SIGTERM, or stopped with a code other
        than 0."""
        processes = [worker.proc for worker in self._background]
        if self._interpreter is not None:
            processes.append(self._interpreter)
        for proc in processes:
            _ask_to_stop(proc)
        failures: list[str] = []
        for worker in self._background:
            code = _wait_or_kill(worker.proc)
            if code != 0:
                log = worker.log.read_text(errors="replace")
                failures.append(
                    f"{worker.block.where}: the worker started here stopped with {code} "
                    f"(expected 0 after SIGTERM):\n{log}"
                )
        if self._interpreter is not None:
            _wait_or_kill(self._interpreter)
        self._background, self._interpreter = [], None
        return failures


class EarlierBlockFailedError(Exception):
    """A block was not run because a block before it in its document failed."""


def _needs_session(block: Block) -> bool:
    try:
        return plan(block).needs_session
    except DocsTestError:
        return False


def _compare_console_output(block: Block, stdout: str) -> None:
    expected = [line for line in block.source.splitlines() if not line.startswith("$ ")]
    actual = [line.rstrip() for line in stdout.strip("\n").splitlines()]
    assert [line.rstrip() for line in expected] == actual, (
        f"the block shows output its commands do not print; they print:\n{stdout}"
    )


def run_bounded(
    argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float = BLOCK_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """``argv`` in a process group of its own, killed with its children after ``timeout``."""
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{stdout}\n{stderr}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def _wait_until_ready(proc: subprocess.Popen[bytes], log: Path, ready_line: str) -> None:
    deadline = time.monotonic() + WORKER_READY_S
    while ready_line not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, (
            f"not ready after {WORKER_READY_S} s:\n{log.read_text()}"
        )
        time.sleep(0.05)


def _read_answer(
    proc: subprocess.Popen[bytes], channel: IO[bytes], timeout: float
) -> dict[str, Any]:
    ready, _, _ = select.select([channel], [], [], timeout)
    if not ready:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout} s")
    line = channel.readline()
    assert line, f"the interpreter exited with {proc.wait(timeout=WORKER_STOP_S)}"
    answer: dict[str, Any] = json.loads(line)
    return answer


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    _ask_to_stop(proc)
    return _wait_or_kill(proc)


def _ask_to_stop(proc: subprocess.Popen[bytes]) -> None:
    """End of input for the interpreter, SIGTERM for a worker (to it alone: it stops its own
    worker processes)."""
    if proc.poll() is not None:
        return
    if proc.stdin is not None:
        proc.stdin.close()
    else:
        proc.send_signal(signal.SIGTERM)


def _wait_or_kill(proc: subprocess.Popen[bytes]) -> int | None:
    """``proc``'s exit code, or None when it had to be killed (with its group) after
    WORKER_STOP_S."""
    try:
        return proc.wait(timeout=WORKER_STOP_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=WORKER_STOP_S)
        return None
    finally:
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
