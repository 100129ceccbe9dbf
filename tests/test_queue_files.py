"""Nobody but the server's user may write the queue: `relay serve` refuses, `relay doctor` says so.

Real files, real modes and owners (the suite runs as root, so it can hand a file to `nobody`),
and the real commands.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from relay.ops import doctor
from relay.ops.doctor import OK, PROBLEM
from relay.store import Store
from tests.conftest import make_config, run_relay, write_config

NOBODY = 65534


def queue_with_mail(tmp_path: Path) -> Path:
    """The queue the server would have made: directory 0700, database 0600, owned by us."""
    path = tmp_path / "queue" / "queue.db"
    Store(str(path)).close()
    return path


def serve(tmp_path: Path) -> tuple[int, list[str]]:
    """`relay serve` on the default test config: its exit status and stderr lines."""
    result = run_relay("serve", "--config", str(write_config(tmp_path)), timeout=30)
    return result.returncode, result.stderr.decode().splitlines()


def test_the_queue_the_server_creates_passes_its_own_check(tmp_path: Path) -> None:
    path = queue_with_mail(tmp_path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert doctor.check_queue_files(make_config(tmp_path)) == [
        doctor.Finding(
            OK,
            "queue",
            str(path),
            "only root can write the queue and its directory: the server must run as root",
        )
    ]


def test_serve_refuses_a_queue_file_others_can_write(tmp_path: Path) -> None:
    path = queue_with_mail(tmp_path)
    path.chmod(0o666)

    status, errors = serve(tmp_path)

    assert status == 1
    assert errors == [
        f"relay: cannot start: queue file {path} is writable by group and others (mode 0666):"
        f" they could change or remove accepted mail; fix: chmod go-w {path}"
    ]
    assert oct(path.stat().st_mode & 0o777) == "0o666"  # refused, not repaired behind our back


def test_serve_refuses_a_queue_directory_its_group_can_write(tmp_path: Path) -> None:
    path = queue_with_mail(tmp_path)
    path.parent.chmod(0o770)

    status, errors = serve(tmp_path)

    assert status == 1
    assert errors == [
        f"relay: cannot start: queue directory {path.parent} is writable by group (mode 0770):"
        f" they could change or remove accepted mail; fix: chmod go-w {path.parent}"
    ]


def test_serve_refuses_queue_files_of_another_user_the_wal_included(tmp_path: Path) -> None:
    path = queue_with_mail(tmp_path)
    wal = Path(f"{path}-wal")
    wal.write_bytes(b"")  # e.g. left by `relay queue` run as another user
    os.chown(wal, NOBODY, NOBODY)
    os.chown(path, NOBODY, NOBODY)

    status, errors = serve(tmp_path)

    assert status == 1
    assert errors == [
        f"relay: cannot start: queue file {path} belongs to nobody, not to root who runs the"
        f" server; fix: chown root {path}",
        f"relay: cannot start: queue file {wal} belongs to nobody, not to root who runs the"
        f" server; fix: chown root {wal}",
    ]


def test_a_world_writable_queue_directory_is_refused_even_before_the_queue_exists(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "queue"
    directory.mkdir(mode=0o777)
    directory.chmod(0o1777)  # sticky, like /tmp: others still could plant a -wal file

    status, errors = serve(tmp_path)

    assert status == 1
    assert errors[0].startswith(
        f"relay: cannot start: queue directory {directory} is writable by group and others"
        " (mode 1777)"
    )
    assert not (directory / "queue.db").exists()


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_doctor_reports_a_writable_queue_as_a_problem_with_the_fix(
    tmp_path: Path, mode: int
) -> None:
    path = queue_with_mail(tmp_path)
    path.chmod(mode)
    who = "group" if mode & 0o020 else "others"

    findings = doctor.check_queue_files(make_config(tmp_path))

    assert findings == [
        doctor.Finding(
            PROBLEM,
            "queue",
            str(path),
            f"queue file {path} is writable by {who} (mode {mode:04o}): they could change or"
            " remove accepted mail",
            f"chmod go-w {path}",
        )
    ]
    assert doctor.exit_code(findings) == 1


def test_doctor_compares_the_queue_with_its_directory_owner_and_the_command_exits_1(
    tmp_path: Path,
) -> None:
    path = queue_with_mail(tmp_path)
    os.chown(path.parent, NOBODY, NOBODY)  # the server runs as nobody; the file is root's

    result = run_relay("doctor", "--json", "--config", str(write_config(tmp_path)), timeout=60)

    queue = [f for f in json.loads(result.stdout)["findings"] if f["check"] == "queue"]
    assert queue == [
        {
            "status": "problem",
            "check": "queue",
            "subject": str(path),
            "message": f"queue file {path} belongs to root, not to nobody who owns the queue"
            " directory",
            "fix": f"chown nobody {path}",
        }
    ]
    assert result.returncode == 1
