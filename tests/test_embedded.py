"""The embedded PostgreSQL starts, is reused, and stops with the last process using it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasker.db.embedded import stop_embedded

ROOT = Path(__file__).resolve().parent.parent
SITE_PACKAGES = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"), None)

SCRIPT = """
import sys, psycopg
from tasker.db.embedded import embedded_url
url = embedded_url(sys.argv[1])
with psycopg.connect(url) as conn:
    version = conn.execute("SHOW server_version_num").fetchone()[0]
    conn.execute("CREATE TABLE IF NOT EXISTS visits (n int)")
    conn.execute("INSERT INTO visits VALUES (1)")
    print(version, conn.execute("SELECT count(*) FROM visits").fetchone()[0])
"""


def _run(data_dir: Path, *, as_user: str | None = None, script: str = SCRIPT) -> tuple[int, int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_RUNTIME_DIR=str(data_dir.parent / "run"))
    command = [sys.executable, "-c", script, str(data_dir)]
    if as_user is not None:
        assert SITE_PACKAGES is not None
        env["PYTHONPATH"] = f"{ROOT}:{SITE_PACKAGES}"
        python = "/usr/bin/python3.11"
        command = ["runuser", "-u", as_user, "--", python, "-c", script, str(data_dir)]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    version, visits = result.stdout.split()
    return int(version), int(visits)


def _stopped(data_dir: Path) -> bool:
    return not (data_dir / "postmaster.pid").exists()


@pytest.mark.slow
def test_embedded_server_is_reused_and_stopped_with_its_last_user(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    (tmp_path / "run").mkdir(mode=0o700)
    version, visits = _run(data_dir)
    assert version >= 180000
    assert visits == 1
    assert _stopped(data_dir)
    assert _run(data_dir) == (version, 2)  # the data was kept and reused
    assert _stopped(data_dir)


@pytest.mark.slow
def test_a_user_killed_before_its_exit_handlers_does_not_keep_the_server_running(
    tmp_path: Path,
) -> None:
    """A process that dies without its exit handlers (SIGKILL; os._exit here) stays in the
    package's list of the server's users: the next process to join forgets it, so the server is
    stopped with the last live user again (it used to run until `tasker db stop`)."""
    data_dir = tmp_path / "pgdata"
    (tmp_path / "run").mkdir(mode=0o700)
    killed = SCRIPT + "sys.stdout.flush()\nimport os\nos._exit(0)\n"
    try:
        version, _visits = _run(data_dir, script=killed)
        assert not _stopped(data_dir), "the killed user's server is left running"
        assert _run(data_dir) == (version, 2)
        assert _stopped(data_dir)
    finally:
        stop_embedded(data_dir)  # whatever failed, leave no server behind


@pytest.mark.slow
def test_embedded_server_runs_for_a_normal_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:  # the suite itself already runs as a normal user
        test_embedded_server_is_reused_and_stopped_with_its_last_user(tmp_path)
        return
    if not (shutil.which("runuser") and Path("/usr/bin/python3.11").exists() and SITE_PACKAGES):
        pytest.fail("needs runuser and /usr/bin/python3.11 to run as a normal user")
    hidden = [p for p in (ROOT, *ROOT.parents) if not p.stat().st_mode & 0o001]
    if hidden:
        pytest.skip(f"the checkout is not reachable by other users ({hidden[0]} is not o+x)")
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True, mode=0o700)
    tmp_path.chmod(0o755)
    shutil.chown(home, "nobody", "nogroup")
    shutil.chown(home / "run", "nobody", "nogroup")
    data_dir = home / "pgdata"
    version, visits = _run(data_dir, as_user="nobody")
    assert version >= 180000 and visits == 1
    import pwd

    assert data_dir.stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert _stopped(data_dir)
