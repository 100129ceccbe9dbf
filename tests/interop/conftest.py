"""What every interop test needs: the real tools, a directory their users can reach, a client.

The tools come from tests/interop/install.sh (`make interop` runs it first). Without them, or
without root (private Postfix instances and OpenSMTPD's mount namespace need it), the tests are
skipped with the reason; under CI they fail instead, so a broken install cannot pass for green.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.mtas import missing_tools


@pytest.fixture(autouse=True)
def interop_tools() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root (private Postfix instances, OpenSMTPD's mount namespace)")
    if missing := missing_tools():
        problems.append("missing " + ", ".join(missing) + ": run bash tests/interop/install.sh")
    if problems:
        reason = "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh directory under /tmp that the servers' own users can traverse (kept after the
    test when RELAY_INTEROP_KEEP is set, for a look at the servers' logs and files)."""
    path = Path(tempfile.mkdtemp(prefix="relay-interop-"))
    path.chmod(0o755)
    yield path
    if not os.environ.get("RELAY_INTEROP_KEEP"):
        shutil.rmtree(path, ignore_errors=True)
