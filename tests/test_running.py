"""Running safely: not as root unless told, and the metrics endpoint on loopback by default.

(The queue file and directory modes, 0600 and 0700, are tested with the store.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import make_config, run_relay, write_config

from relay.config import from_mapping
from relay.ops.cli import root_refused


@pytest.mark.parametrize(
    ("euid", "allow_root", "env_value", "refused"),
    [
        (0, False, "", True),
        (0, False, "0", True),
        (0, True, "", False),
        (0, False, "1", False),
        (999, False, "", False),
    ],
)
def test_root_is_refused_unless_allowed_by_flag_or_environment(
    euid: int, allow_root: bool, env_value: str, refused: bool
) -> None:
    assert root_refused(euid, allow_root, env_value) is refused


@pytest.mark.skipif(os.geteuid() != 0, reason="needs to run as root to see the refusal")
def test_serve_as_root_without_the_override_exits_1_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, metrics={"listen": ""})
    result = run_relay("serve", "--config", str(config), env={"RELAY_ALLOW_ROOT": ""})
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "relay: cannot start: refusing to run as root; run as an unprivileged user (the systemd"
        " unit has User=relay), or pass --allow-root (or set RELAY_ALLOW_ROOT=1)\n"
    )
    assert not (tmp_path / "queue" / "queue.db").exists()  # refused before touching anything


def test_metrics_listen_on_loopback_unless_configured(tmp_path: Path) -> None:
    data = {
        "hostname": "relay.test",
        "postmaster": "hostmaster@example.test",  # SMTP listens on every address by default
        "queue": {"path": str(tmp_path / "queue.db")},
        "domain": [{"name": "example.test"}],
    }
    assert from_mapping(data).metrics.listen == ("127.0.0.1", 9325)
    assert make_config(tmp_path, metrics={"listen": ""}).metrics.listen is None
